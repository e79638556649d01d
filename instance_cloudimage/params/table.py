"""OS parameters: declared once here, written to parameters.list, checked by verify.

Security: never include a parameter's value in a message; Ganeti logs script output and
private/secret parameters arrive as plain OSP_* variables.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from instance_cloudimage.ganeti.variants import CHECKSUM_RE, SEEDS, Variant
from instance_cloudimage.runtime.errors import ImageFetchError, ParameterError
from instance_cloudimage.runtime.localpath import check_local_image_path
from instance_cloudimage.runtime.settings import parse_bool
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.network import NETWORK_MODES
from instance_cloudimage.seed.sshkeys import KEY_TYPES, parse_authorized_keys
from instance_cloudimage.seed.values import (
    check_hostname,
    check_nameservers,
    check_password_hash,
    check_search,
    parse_choice,
)
from instance_cloudimage.sources.urlpolicy import check_url, policy_for

Check = Callable[[str, SiteConfig], None]


class Text(StrEnum):
    """What characters a parameter's documented format has room for."""

    LINE = "line"  # one line: no control character, no white space at either end
    LINES = "lines"  # lines: newlines (and CR before them) besides, white space at the ends
    ANY = "any"  # user-data: a script or a document, checked by its own parser


@dataclass(frozen=True)
class Parameter:
    name: str
    description: str
    check: Check
    secret: bool = False  # withheld from hooks unless the site allows it
    text: Text = Text.LINE


# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators: none has a place
# in a one-line value, and several end a line in a log, a YAML file or a terminal.
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
CONTROL_IN_LINES_RE = re.compile("[\x00-\x09\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


def check_text(p: Parameter, value: str) -> None:
    """The characters every value of ``p`` must keep to, whatever its format says besides."""
    if p.text is Text.ANY:
        return
    pattern = CONTROL_RE if p.text is Text.LINE else CONTROL_IN_LINES_RE
    if pattern.search(value):
        what = "a control character" if p.text is Text.LINE else "a control character other than a newline"
        raise ParameterError(f"{p.name} contains {what} or a Unicode line separator", "remove it")
    if p.text is Text.LINE and value != value.strip():
        raise ParameterError(f"{p.name} must not start or end with white space")


def check_image(value: str, site: SiteConfig) -> None:
    v = value.strip()
    if not v:
        raise ParameterError("image must not be empty")
    try:
        parts = urlsplit(v)
    except ValueError:
        # Security: urlsplit's message quotes the host; the URL may be private.
        raise ParameterError("image is not a valid URL", "check the brackets around an IPv6 address") from None
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ParameterError("image URL has no host")
        try:
            # The same address policy as at download time, so verify refuses early.
            check_url(v, policy_for(True, site))
        except ImageFetchError as e:
            raise ParameterError(e.message, e.hint) from None
        return
    if scheme == "file":
        check_local_image_path(parts.path, site, what="image")
        return
    if scheme:
        raise ParameterError(f"image URL scheme '{scheme}' is not supported",
                             "use https://, http://, file:// or an absolute path")
    if not os.path.isabs(v):
        raise ParameterError("image must be an absolute path or an http(s) URL")
    check_local_image_path(v, site, what="image")


def check_image_checksum(value: str, site: SiteConfig) -> None:
    if not CHECKSUM_RE.match(value.strip().lower()):
        raise ParameterError("image_checksum must be sha256:<64 hex digits> or sha512:<128 hex digits>")


ARCH_RE = re.compile(r"^[a-z0-9_]+$")


def check_arch(value: str, site: SiteConfig) -> None:
    if not ARCH_RE.match(value):
        raise ParameterError("arch must be a machine name such as x86_64 or aarch64")


def yes_or_no(name: str) -> Check:
    """The check of a yes/no parameter called ``name``."""

    def check(value: str, site: SiteConfig) -> None:
        try:
            parse_bool(value)
        except ValueError:
            raise ParameterError(f"{name} must be yes or no") from None

    return check


def check_ssh_authorized_keys(value: str, site: SiteConfig) -> None:
    parse_authorized_keys(value)


def check_user_data(value: str, site: SiteConfig) -> None:
    from instance_cloudimage.seed.userdata import (
        decode_user_data,  # PyYAML with it: loaded only when user_data is given
    )

    decode_user_data(value)


def check_network(value: str, site: SiteConfig) -> None:
    parse_choice("network", value, NETWORK_MODES)


def check_seed(value: str, site: SiteConfig) -> None:
    parse_choice("seed", value, SEEDS)


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("image", "Image path or http(s) URL replacing the variant's image "
              "(local paths only inside the site's allowed directories)", check_image),
    Parameter("image_checksum", "Expected digest of the image as sha256:HEX or sha512:HEX",
              check_image_checksum),
    Parameter("arch", "Machine architecture of the image to use (default: the node's, e.g. x86_64)",
              check_arch),
    Parameter("grow_root", "Grow the root partition and filesystem to the end of disk 0 on the node: yes or no "
              "(default: the variant's GrowRoot; cloud-init grows on first boot by itself)", yes_or_no("grow_root")),
    Parameter("hostname", "Guest host name, short or fully qualified (default: the instance name)",
              check_hostname),
    Parameter("ssh_authorized_keys", "OpenSSH public keys for the image's default user (root on flamingo), "
              "separated by newlines or ';'", check_ssh_authorized_keys, text=Text.LINES),
    Parameter("password_hash", "crypt(3) hash ($y$, $6$, $5$, $2b$) of the default user's password; "
              "pass it with --os-parameters-secret", check_password_hash, secret=True),
    Parameter("user_data", "User-data: #cloud-config, #! script, MIME, #include, jinja or JSON, plain or "
              "base64:..., gzip allowed, at most 64 KiB", check_user_data, secret=True, text=Text.ANY),
    Parameter("dns_nameservers", "DNS server addresses for the guest, separated by spaces or commas",
              check_nameservers),
    Parameter("dns_search", "DNS search domains for the guest, separated by spaces or commas "
              "(needs dns_nameservers)", check_search),
    Parameter("network", "Guest network: auto (static from the NIC's Ganeti network, else DHCP), dhcp or none",
              check_network),
    Parameter("seed", "Seed delivery: auto, nocloud-fs, nocloud-disk, configdrive-disk, nocloud-partition, "
              "configdrive-partition or none", check_seed),
    Parameter("metad_refresh", "cloud-init guests with the instance-communication NIC apply metad's current "
              "ssh_authorized_keys and hostname at every boot: yes or no (default: the site's [Seed] MetadRefresh, "
              "yes)", yes_or_no("metad_refresh")),
    Parameter("keep_instance_id", "Import only: keep the seed's instance-id when new NICs change its network "
              "configuration, so cloud-init does not redo its first boot: yes or no (default: the site's "
              "[Import] KeepInstanceId, no)", yes_or_no("keep_instance_id")),
)


# Values a log must never show, beyond the secret parameters: the image may be a URL with a token or a
# private path, and keys identify their owners.  Unknown parameters are hidden too.
PRIVATE = frozenset({"image", "ssh_authorized_keys"})
MIN_HIDDEN = 6  # shorter pieces are too common to replace ("yes", "auto")
MIN_HIDDEN_LINE = 12
MIN_HIDDEN_TOKEN = 16
# Text our own messages use, which a value may contain as a whole line or token.
NEVER_HIDDEN = frozenset({"#cloud-config", "#cloud-config-archive", "#cloud-config-jsonp", "#cloud-boothook",
                          "#part-handler", "#include-once", "## template: jinja", "MIME-Version: 1.0"})


BASE64_PREFIX = "base64:"  # as seed/userdata.py reads it


def _pieces(text: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    tokens = re.split(r"[\s;,]+", text)
    out = [text.strip(), repr(text)[1:-1]]
    out += [ln for ln in lines if len(ln) >= MIN_HIDDEN_LINE]
    out += [t for t in tokens if len(t) >= MIN_HIDDEN_TOKEN and t not in KEY_TYPES]
    return [p for p in out if len(p) >= MIN_HIDDEN and p not in NEVER_HIDDEN]


def values_to_hide(params: Mapping[str, str]) -> list[str]:
    """What log.redact must scrub for these parameters: secret and private values, their lines, long
    tokens (key bodies), the parts of an image URL and a base64 user_data decoded."""
    known = {p.name: p for p in PARAMETERS}
    out: list[str] = []
    for name, value in params.items():
        p = known.get(name)
        if p is not None and not p.secret and name not in PRIVATE:
            continue
        out += _pieces(value)
        if name == "image":
            try:
                parts = urlsplit(value.strip())
            except ValueError:
                continue
            out += [x for x in (parts.netloc, parts.path, parts.query) if len(x) >= MIN_HIDDEN]
        elif name == "user_data" and value.startswith(BASE64_PREFIX):
            try:
                decoded = base64.b64decode("".join(value[len(BASE64_PREFIX):].split()))
            except (binascii.Error, ValueError):
                continue
            out += _pieces(decoded.decode("utf-8", "replace"))
    return out


def parameter_names() -> list[str]:
    return [p.name for p in PARAMETERS]


def render_parameters_list() -> str:
    """parameters.list: exactly one 'name description' line each; Ganeti crashes on blanks."""
    lines = []
    for p in PARAMETERS:
        if not re.fullmatch(r"[a-z0-9_-]+", p.name) or not p.description.strip() or "\n" in p.description:
            raise AssertionError(f"bad parameter declaration {p.name!r}")
        lines.append(f"{p.name} {p.description}")
    return "\n".join(lines) + "\n"


def validate_parameters(params: Mapping[str, str], site: SiteConfig) -> list[str]:
    """Check every parameter; return one message per problem (empty when all are fine)."""
    known = {p.name: p for p in PARAMETERS}
    problems = []
    for name in sorted(params):
        p = known.get(name)
        if p is None:
            problems.append(f"unknown OS parameter '{name}' (known: {', '.join(sorted(known))})")
            continue
        try:
            check_text(p, params[name])
            p.check(params[name], site)
        except ParameterError as e:
            problems.append(str(e))
    return problems


def grow_requested(params: Mapping[str, str], variant: Variant) -> bool:
    """The ``grow_root`` parameter, else the variant's GrowRoot (off unless a variant says yes)."""
    raw = (params.get("grow_root") or "").strip()
    if not raw:
        return variant.grow_root
    try:
        return parse_bool(raw)
    except ValueError:
        raise ParameterError("grow_root must be yes or no") from None
