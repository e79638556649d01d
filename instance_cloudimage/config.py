"""Site configuration: ``<config-dir>/defaults.conf`` and the directories we use.

The config and cache directories default to /etc/ganeti/instance-cloudimage and
/var/cache/instance-cloudimage; ``install --config-dir/--cache-dir`` bakes other ones into an
installed OS definition, and the local ``create`` takes the same options, so tests and a second
site can run side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .settings import (
    Setting,
    parse_bool,
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


SITE_SETTINGS = (
    Setting("Images", "AllowedDirectories", "allowed_dirs", parse_list, (DEFAULT_IMAGE_DIR,),
            "directories from which local image paths (the image parameter, file:// URLs) are read"),
    Setting("Images", "MaxDownloadSize", "max_download_size", parse_size, 64 * 1024**3,
            "largest image file that is downloaded"),
    Setting("HTTP", "CABundle", "ca_bundle", parse_str, None, "extra CA bundle for TLS verification"),
    Setting("HTTP", "Proxy", "proxy", parse_str, None, "HTTP(S) proxy URL (Ganeti resets the environment)"),
    Setting("HTTP", "NoProxy", "no_proxy", parse_str, None, "hosts that bypass the proxy"),
    Setting("HTTP", "ConnectTimeout", "connect_timeout", parse_positive_float, 15.0, "seconds"),
    Setting("HTTP", "ReadTimeout", "read_timeout", parse_positive_float, 60.0, "seconds without data"),
    Setting("HTTP", "Retries", "retries", int, 5, "attempts on connection errors and 5xx"),
    Setting("Cache", "MaxSize", "cache_max_size", parse_size, 50 * 1024**3, "cache size cap (LRU eviction)"),
    Setting("Hooks", "PassSecrets", "hooks_pass_secrets", parse_bool, False,
            "pass password_hash and user_data to hooks"),
    Setting("Hooks", "Timeout", "hook_timeout", parse_positive_float, 600.0, "seconds per hook"),
    Setting("Disks", "WipedByGaneti", "disks_wiped", parse_bool, False,
            "new block devices read back zeros (gnt-cluster modify --prealloc-wipe-disks yes, or thin "
            "storage): zero blocks of an image are then skipped on a first install"),
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
