"""Parsers and checks for the seeding OS parameters (hostname, password_hash, DNS, choices, seed).

Each ``parse_*`` returns the normalised value and raises ParameterError; the ``check_*``
wrappers have the ``Check`` signature of params.PARAMETERS.  Messages name the parameter, never
its value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from instance_cloudimage.ganeti.variants import SEEDS, Variant
from instance_cloudimage.runtime.errors import ParameterError

_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
MAX_NAMESERVERS = 8  # glibc reads 3; systemd-resolved takes more
MAX_SEARCH = 6       # the classic resolv.conf limit cloud-init and ifupdown still honour


@dataclass(frozen=True)
class HostName:
    """``short`` is /etc/hostname's name; ``fqdn`` is set when the name had a domain."""

    short: str
    fqdn: str | None

    @property
    def full(self) -> str:
        return self.fqdn or self.short


def parse_hostname(value: str, what: str = "hostname") -> HostName:
    """RFC 1123 host name, short or fully qualified (a trailing dot is dropped).

    A name with dots is the FQDN and its first label the short host name; a name without dots
    is the host name alone (no domain is guessed).
    """
    name = value.strip().rstrip(".")
    if not name:
        raise ParameterError(f"{what} must not be empty")
    if len(name) > 253:
        raise ParameterError(f"{what} is longer than 253 characters")
    labels = name.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        raise ParameterError(f"{what} is not a valid host name",
                             "use letters, digits and '-' in dot-separated labels of at most 63 characters "
                             "(RFC 1123); no '_', no leading or trailing '-'")
    if labels[-1].isdigit():
        raise ParameterError(f"{what} must not end in an all-numeric label", "an IP address is not a host name")
    return HostName(short=labels[0], fqdn=name if len(labels) > 1 else None)


def check_hostname(value: str, site: object = None) -> None:
    parse_hostname(value)


# crypt(3) hashes the guest's chpasswd -e/usermod -p take (libxcrypt); the salt/hash alphabet
# is "./0-9A-Za-z".  MD5 ($1$) and DES are refused as too weak to hand out.
_B64 = r"[./0-9A-Za-z]"
_HASH_RES = {
    "yescrypt": re.compile(rf"^\$y\${_B64}+\${_B64}*\${_B64}{{43}}$"),
    "gost-yescrypt": re.compile(rf"^\$gy\${_B64}+\${_B64}*\${_B64}{{43}}$"),
    "scrypt": re.compile(rf"^\$7\${_B64}{{14,}}\${_B64}{{43}}$"),
    "bcrypt": re.compile(rf"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\${_B64}{{53}}$"),
    "sha512crypt": re.compile(rf"^\$6\$(rounds=[0-9]+\$)?[^$:\s]{{1,16}}\${_B64}{{86}}$"),
    "sha256crypt": re.compile(rf"^\$5\$(rounds=[0-9]+\$)?[^$:\s]{{1,16}}\${_B64}{{43}}$"),
}


def parse_password_hash(value: str) -> str:
    v = value.strip()
    if v.startswith("$1$"):
        raise ParameterError("password_hash is an MD5-crypt ($1$) hash, which is too weak",
                             "make one with: mkpasswd -m yescrypt (or -m sha-512)")
    for pattern in _HASH_RES.values():
        if pattern.match(v):
            return v
    raise ParameterError("password_hash is not a crypt(3) hash such as $y$..., $6$..., $5$... or $2b$...",
                         "give the output of 'mkpasswd -m yescrypt', never the password itself; "
                         "pass it with --os-parameters-secret")


def check_password_hash(value: str, site: object = None) -> None:
    parse_password_hash(value)


def _items(value: str) -> list[str]:
    return [v for v in re.split(r"[\s,;]+", value.strip()) if v]


def parse_nameservers(value: str) -> tuple[str, ...]:
    items = _items(value)
    if len(items) > MAX_NAMESERVERS:
        raise ParameterError(f"dns_nameservers lists {len(items)} servers; at most {MAX_NAMESERVERS} are accepted")
    out = []
    for i, item in enumerate(items, 1):
        try:
            out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ParameterError(f"dns_nameservers: entry {i} is not an IPv4 or IPv6 address") from None
    return tuple(dict.fromkeys(out))


def check_nameservers(value: str, site: object = None) -> None:
    parse_nameservers(value)


def parse_search(value: str) -> tuple[str, ...]:
    items = _items(value)
    if len(items) > MAX_SEARCH:
        raise ParameterError(f"dns_search lists {len(items)} domains; at most {MAX_SEARCH} are accepted")
    for i, item in enumerate(items, 1):
        try:
            parse_hostname(item, what=f"dns_search: entry {i}")
        except ParameterError as e:
            raise ParameterError(e.message) from None
    return tuple(dict.fromkeys(i.rstrip(".") for i in items))


def check_search(value: str, site: object = None) -> None:
    parse_search(value)


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    v = value.strip()
    if v not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(choices)}")
    return v


def requested_delivery(params: Mapping[str, str], variant: Variant) -> str:
    """The ``seed`` parameter, else the variant's Seed setting (both may say ``auto``)."""
    value = (params.get("seed") or "").strip() or variant.seed
    if value not in SEEDS:
        raise ParameterError(f"seed must be one of {', '.join(SEEDS)}")
    return value


def unseeded_reason(params: Mapping[str, str], variant: Variant) -> str | None:
    """Why nothing is seeded (``seed=none``, or ``auto`` for a variant whose agent is none), or None."""
    requested = requested_delivery(params, variant)
    if requested == "none":
        return "seed=none"
    if requested == "auto" and variant.agent == "none":
        return "the variant's agent is none"
    return None


def guest_mount_reason(params: Mapping[str, str], variant: Variant) -> str | None:
    """Why seeding mounts the guest's filesystem (loop devices and mount: root only), or None.

    Mirrors seed/deliver.py's plan before anything is known about the image: ``auto`` for
    cloud-init means nocloud-fs whenever the image has a Linux filesystem, which is the rule.
    """
    if unseeded_reason(params, variant) is not None:
        return None
    if variant.agent == "flamingo":
        return "the flamingo agent's settings are written into the guest's filesystem"
    requested = requested_delivery(params, variant)
    if requested in ("nocloud-fs", "auto"):
        return f"seed={requested} writes the cloud-init seed into the guest's filesystem"
    return None
