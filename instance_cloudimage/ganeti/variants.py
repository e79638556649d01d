"""Variants are data: ``variants/<name>.conf``, one per distro image.

The shipped variants live in the project's ``variants/`` directory; a site adds or overrides
them in ``<config-dir>/variants/`` (a site file with a shipped name is read on top of the shipped
one, so it may override just one key).  Every file goes through ``VARIANT_SETTINGS``.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from instance_cloudimage.image.formats import DECLARABLE_FORMATS
from instance_cloudimage.runtime.errors import ConfigError, ParameterError
from instance_cloudimage.runtime.resources import shipped_dir
from instance_cloudimage.runtime.settings import (
    ParsedIni,
    Setting,
    parse_bool,
    parse_choice,
    parse_list,
    parse_str,
    read_ini,
)
from instance_cloudimage.runtime.siteconfig import Paths

VARIANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
CHECKSUM_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
AGENTS = ("cloud-init", "flamingo", "none")
SEEDS = ("auto", "nocloud-fs", "nocloud-disk", "configdrive-disk", "nocloud-partition", "configdrive-partition",
         "none")


def parse_checksum(value: str) -> str:
    v = value.strip().lower()
    if not CHECKSUM_RE.match(v):
        raise ValueError("expected sha256:<64 hex digits> or sha512:<128 hex digits>")
    return v


def parse_location(value: str) -> str:
    """A URL or path; a malformed one (bad IPv6 brackets) is refused here, not when it is fetched."""
    v = value.strip()
    urlsplit(v)  # ValueError names the problem
    return v


def parse_arch_names(value: str) -> dict[str, str]:
    out = {}
    for item in parse_list(value):
        machine, sep, name = item.partition("=")
        if not sep or not machine or not name:
            raise ValueError("expected machine=name pairs, e.g. x86_64=amd64 aarch64=arm64")
        out[machine] = name
    return out


VARIANT_SETTINGS = (
    Setting("Variant", "Description", "description", parse_str, "", "one line shown to users"),
    Setting("Variant", "Agent", "agent", parse_choice(*AGENTS), "cloud-init", "the guest agent"),
    Setting("Variant", "Seed", "seed", parse_choice(*SEEDS), "auto", "default seed delivery"),
    Setting("Variant", "NetworkConfigVersion", "network_config_version", parse_choice("1", "2"), "2",
            "cloud-init network-config version the image understands"),
    Setting("Variant", "DefaultUser", "default_user", parse_str, "",
            "the image's default login user (cloud-init's default_user); password_hash sets its password"),
    Setting("Variant", "GrowRoot", "grow_root", parse_bool, False,
            "grow the root partition and filesystem on the host"),
    Setting("Variant", "Architectures", "architectures", parse_list, ("x86_64",),
            "machine names (uname -m) this variant has images for"),
    Setting("Image", "URL", "url", parse_location, None, "image URL or path; {arch} is substituted", qualified=True),
    Setting("Image", "Format", "format", parse_choice("auto", *DECLARABLE_FORMATS), "auto",
            "declared format; the detected one must agree", qualified=True),
    Setting("Image", "Checksum", "checksum", parse_checksum, None, "pinned sha256:/sha512: digest",
            qualified=True),
    Setting("Image", "ChecksumURL", "checksum_url", parse_location, None,
            "SHA256SUMS/SHA512SUMS/CHECKSUM file; {arch} is substituted", qualified=True),
    Setting("Image", "SignatureURL", "signature_url", parse_location, None,
            "detached OpenPGP signature of the checksum file ('inline' for a clear-signed one)",
            qualified=True),
    Setting("Image", "NamePattern", "name_pattern", parse_str, None,
            "glob choosing the image file name from the checksum file (newest version wins); the URL "
            "then contains {name}", qualified=True),
    Setting("Image", "Keyring", "keyring", parse_str, None,
            "OpenPGP keyring for gpgv: absolute, or relative to the config dir"),
    Setting("Image", "ArchNames", "arch_names", parse_arch_names, {},
            "how the distro spells machine names in URLs"),
)


@dataclass(frozen=True)
class ImageSpec:
    """Where one architecture's image of a variant is, and how to verify it."""

    url: str
    format: str
    checksum: str | None
    checksum_url: str | None
    signature_url: str | None
    keyring: str | None
    name_pattern: str | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    description: str
    agent: str
    seed: str
    network_config_version: int
    grow_root: bool
    architectures: tuple[str, ...]
    parsed: ParsedIni
    default_user: str = ""

    def _get(self, dest: str, arch: str) -> Any:
        return self.parsed.qualified.get((dest, arch), self.parsed.values[dest])

    def image_for(self, arch: str) -> ImageSpec:
        """The image spec for ``arch`` (a uname -m machine name).  Raises ParameterError."""
        if arch not in self.architectures:
            raise ParameterError(f"variant {self.name} has no image for architecture {arch}",
                                 f"available: {', '.join(self.architectures)}")
        name = self.parsed.values["arch_names"].get(arch, arch)

        def subst(v: str | None) -> str | None:
            return v.replace("{arch}", name) if v else v

        url = subst(self._get("url", arch))
        if not url:
            raise ConfigError(f"variant {self.name} ({self.path}) has no [Image] URL for {arch}")
        name_pattern = subst(self._get("name_pattern", arch))
        if ("{name}" in url) != bool(name_pattern):
            raise ConfigError(f"variant {self.name} ({self.path}): a URL with {{name}} and NamePattern go together")
        return ImageSpec(
            url=url,
            format=self._get("format", arch),
            checksum=self._get("checksum", arch),
            checksum_url=subst(self._get("checksum_url", arch)),
            signature_url=subst(self._get("signature_url", arch)),
            keyring=self._get("keyring", arch),
            name_pattern=name_pattern,
        )


def shipped_variants_dir() -> Path:
    return shipped_dir("variants")


def variant_files(paths: Paths) -> dict[str, list[Path]]:
    """Variant name → the files that define it, shipped first, then the site's."""
    files: dict[str, list[Path]] = {}
    for directory in (shipped_variants_dir(), paths.site_variants):
        if not directory.is_dir():
            continue
        for f in sorted(directory.glob("*.conf")):
            files.setdefault(f.stem, []).append(f)
    return files


def list_variants(paths: Paths) -> list[str]:
    return sorted(n for n in variant_files(paths) if VARIANT_NAME_RE.match(n))


def unknown_variant_hint(name: str, known: Iterable[str]) -> str:
    """The closest known name, if one is close, and where the list is."""
    import difflib  # here: every OS script imports this module, and only a typo needs difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    listing = "'instance-cloudimage variants' lists them all"
    return f"did you mean {close[0]}? {listing}" if close else listing


# Shipped for trying the provider and for tests, not for production instances: install leaves it
# out of the variants.list it writes.
NOT_OFFERED_BY_DEFAULT = frozenset({"demo"})
VARIANTS_LIST_HEADER = """\
# The variants of instance-cloudimage this node offers to Ganeti, one name a line.
# Ganeti reads this file through <os-dir>/variants.list; a variant not listed here is refused.
# Keep it the same on every node: gnt-cluster copyfile {path}
"""


def default_offered(paths: Paths) -> list[str]:
    """What a new variants.list offers: every variant (the site's too) but the demo."""
    return [n for n in list_variants(paths) if n not in NOT_OFFERED_BY_DEFAULT]


def render_variants_list(names: list[str], path: Path) -> str:
    return VARIANTS_LIST_HEADER.format(path=path) + "".join(f"{n}\n" for n in names)


def read_offered(paths: Paths) -> list[str] | None:
    """The names in ``<config-dir>/variants.list``, read as Ganeti reads it (blank lines and lines
    starting with '#' skipped), or None if there is none (then every variant is offered: the local
    create and a config directory made by hand).  Raises ConfigError."""
    try:
        text = paths.variants_list.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {paths.variants_list}: {getattr(e, 'strerror', None) or e}") from None
    return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]


def check_offered(name: str, paths: Paths) -> None:
    """Refuse a variant the node's variants.list does not list.  Raises ParameterError."""
    offered = read_offered(paths)
    if offered is not None and name not in offered:
        raise ParameterError(f"variant {name!r} is not offered on this node",
                             f"an administrator adds it to {paths.variants_list} on every node")


def load_variant(name: str, paths: Paths) -> Variant:
    """Parse a variant by name.  Raises ParameterError (unknown) or ConfigError (bad file)."""
    if not VARIANT_NAME_RE.match(name):
        raise ParameterError(f"variant name {name!r} is malformed")
    known = variant_files(paths)
    files = known.get(name)
    if not files:
        raise ParameterError(f"unknown variant {name!r}", unknown_variant_hint(name, known))
    parsed: ParsedIni | None = None
    for f in files:
        parsed = read_ini(f, VARIANT_SETTINGS, what="variant", base=parsed)
    assert parsed is not None
    v = parsed.values
    if not v["url"] and not any(d == "url" for d, _ in parsed.qualified):
        raise ConfigError(f"variant {name} ({files[-1]}) has no [Image] URL")
    return Variant(
        name=name,
        path=files[-1],
        description=v["description"],
        agent=v["agent"],
        seed=v["seed"],
        network_config_version=int(v["network_config_version"]),
        grow_root=v["grow_root"],
        architectures=tuple(v["architectures"]),
        parsed=parsed,
        default_user=v["default_user"],
    )


def host_architecture() -> str:
    return platform.machine()
