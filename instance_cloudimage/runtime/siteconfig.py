"""Site configuration: ``<config-dir>/defaults.conf`` and the directories we use.

The config and cache directories default to /etc/ganeti/instance-cloudimage and
/var/cache/instance-cloudimage; ``install --config-dir/--cache-dir`` bakes other ones into an
installed OS definition, and the local ``create`` takes the same options, so tests and a second
site can run side by side.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from instance_cloudimage.runtime.errors import ConfigError
from instance_cloudimage.runtime.settings import (
    Setting,
    parse_bool,
    parse_choice,
    parse_list,
    parse_positive_float,
    parse_size,
    parse_str,
    read_ini,
)

DEFAULT_CONFIG_DIR = Path("/etc/ganeti/instance-cloudimage")
DEFAULT_CACHE_DIR = Path("/var/cache/instance-cloudimage")
DEFAULT_IMAGE_DIR = "/var/lib/instance-cloudimage/images"
SITE_CONFIG_NAME = "defaults.conf"


def parse_zstd_level(value: str) -> int:
    level = int(value)
    if not 1 <= level <= 19:
        raise ValueError("must be between 1 and 19")
    return level


def parse_networks(value: str) -> tuple[str, ...]:
    nets = parse_list(value)
    for n in nets:
        ipaddress.ip_network(n, strict=False)  # ValueError names the bad one
    return nets


def parse_count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError("must not be negative")
    return n


@dataclass(frozen=True)
class Paths:
    config_dir: Path = DEFAULT_CONFIG_DIR
    cache_dir: Path = DEFAULT_CACHE_DIR

    @property
    def site_config(self) -> Path:
        return self.config_dir / SITE_CONFIG_NAME

    @property
    def site_variants(self) -> Path:
        return self.config_dir / "variants"

    @property
    def site_hooks(self) -> Path:
        return self.config_dir / "hooks.d"

    @property
    def variants_list(self) -> Path:
        """The variants this node offers; the OS definition's variants.list links to it."""
        return self.config_dir / "variants.list"


SITE_SETTINGS = (
    Setting("Images", "AllowedDirectories", "allowed_dirs", parse_list, (DEFAULT_IMAGE_DIR,),
            "directories from which local image paths (the image parameter, file:// URLs) are read"),
    Setting("Images", "AllowPrivateURLs", "allow_private_urls", parse_bool, False,
            "let the image parameter reach loopback, private and link-local addresses"),
    Setting("Images", "AllowedURLHosts", "allowed_url_hosts", parse_list, (),
            "host names the image parameter may reach whatever they resolve to (.example.org: a domain)"),
    Setting("Images", "AllowedURLNetworks", "allowed_url_networks", parse_networks, (),
            "address ranges the image parameter may reach, e.g. 10.1.0.0/16"),
    Setting("Images", "AllowPlainHTTP", "allow_plain_http", parse_bool, False,
            "accept http:// in the image parameter without an image_checksum"),
    Setting("Images", "TrustedDirectories", "trusted_dirs", parse_list, (),
            "local image files inside these directories are trusted even when the image parameter names "
            "them (they must also be inside AllowedDirectories)"),
    Setting("Images", "TrustImageParameter", "trust_image_parameter", parse_bool, False,
            "trust every image the image parameter names (only where everyone who may add instances is an "
            "administrator)"),
    Setting("Images", "MountUntrusted", "mount_untrusted", parse_bool, False,
            "let the node's kernel mount untrusted images' filesystems (nocloud-fs, host growth, TARGET for "
            "post-write hooks, flamingo, re-seeding in the guest)"),
    Setting("Images", "MaxDownloadSize", "max_download_size", parse_size, 64 * 1024**3,
            "largest image file that is downloaded"),
    Setting("HTTP", "CABundle", "ca_bundle", parse_str, None, "extra CA bundle for TLS verification"),
    Setting("HTTP", "Proxy", "proxy", parse_str, None, "HTTP(S) proxy URL (Ganeti resets the environment)"),
    Setting("HTTP", "NoProxy", "no_proxy", parse_str, None, "hosts that bypass the proxy"),
    Setting("HTTP", "ConnectTimeout", "connect_timeout", parse_positive_float, 15.0, "seconds"),
    Setting("HTTP", "ReadTimeout", "read_timeout", parse_positive_float, 60.0, "seconds without data"),
    Setting("HTTP", "Retries", "retries", parse_count, 5, "retries on connection errors, timeouts and 5xx"),
    Setting("HTTP", "RetryBackoff", "retry_backoff", parse_positive_float, 2.0,
            "seconds before the first retry; doubled each time, at most 60"),
    Setting("HTTP", "MaxRedirects", "max_redirects", parse_count, 10, "redirect hops followed"),
    Setting("Cache", "MaxSize", "cache_max_size", parse_size, 50 * 1024**3,
            "cache size cap; least recently used entries not in use are evicted (0: keep nothing)"),
    Setting("Hooks", "PassSecrets", "hooks_pass_secrets", parse_bool, False,
            "pass secret OS parameters (password_hash, user_data, ...) to hooks"),
    Setting("Hooks", "Timeout", "hook_timeout", parse_positive_float, 600.0, "seconds per hook"),
    Setting("Export", "Format", "export_format", parse_choice("compact", "raw"), "compact",
            "compact (data extents only; our import reads it) or raw (any provider's import reads it)"),
    Setting("Export", "Compression", "export_compression", parse_choice("none", "zstd"), "none",
            "compress compact exports with zstd (import detects it)"),
    Setting("Export", "ZstdLevel", "export_zstd_level", parse_zstd_level, 3, "zstd level, 1 to 19"),
    Setting("Import", "Reseed", "import_reseed", parse_bool, True,
            "after an import, update the seed on the disk for the instance's NICs and name (no: the disk "
            "stays a byte-for-byte copy of the export)"),
    Setting("Import", "KeepInstanceId", "import_keep_instance_id", parse_bool, False,
            "when an import rewrites the seed's network configuration for new NICs, keep its instance-id "
            "(the keep_instance_id parameter overrides this)"),
    Setting("Seed", "MetadRefresh", "metad_refresh", parse_bool, True,
            "cloud-init guests with the instance-communication NIC apply metad's ssh_authorized_keys and hostname "
            "at every boot (the metad_refresh parameter overrides this)"),
    Setting("Disks", "WipedByGaneti", "disks_wiped", parse_bool, False,
            "new block devices read back zeros (gnt-cluster modify --prealloc-wipe-disks yes, or thin "
            "storage): zero blocks of an image are then skipped on a first install"),
    Setting("Disks", "StagingDirectory", "staging_dir", parse_str, None,
            "where a disk reachable only through a URI is staged while it is written or exported "
            "(default <cache-dir>/staging); needs room for the disk's data, not its size"),
)


@dataclass(frozen=True)
class SiteConfig:
    paths: Paths = field(default_factory=Paths)
    values: Any = field(default_factory=lambda: MappingProxyType({s.dest: s.default for s in SITE_SETTINGS}))
    mirrors: tuple[tuple[str, str], ...] = ()

    def get(self, dest: str) -> Any:
        return self.values[dest]

    @property
    def allowed_dirs(self) -> tuple[str, ...]:
        return tuple(self.values["allowed_dirs"])


def load_site_config(paths: Paths) -> SiteConfig:
    """Read ``defaults.conf`` if it exists; defaults otherwise.  Raises ConfigError."""
    path = paths.site_config
    if not path.exists():
        return SiteConfig(paths=paths)
    parsed = read_ini(path, SITE_SETTINGS, what="site configuration", free_sections=("Mirrors",))
    mirrors = tuple(parsed.free_sections.get("mirrors", {}).items())
    return SiteConfig(paths=paths, values=MappingProxyType(dict(parsed.values)), mirrors=mirrors)


# Written by ``instance-cloudimage install`` beside the OS scripts: the directories baked in.
INSTALL_INFO = "instance-cloudimage.json"


def installed_paths(script_path: str) -> Paths:
    """The Paths baked into the OS directory that holds ``script_path`` (defaults otherwise)."""
    info_file = Path(script_path).resolve().parent / INSTALL_INFO
    try:
        info = json.loads(info_file.read_text())
    except FileNotFoundError:
        return Paths()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{info_file} is unreadable ({e}); re-run 'instance-cloudimage install'") from None
    return Paths(config_dir=Path(info["config_dir"]), cache_dir=Path(info["cache_dir"]))
