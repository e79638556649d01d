"""The ``user_data`` OS parameter: decoding, classification, and merging with our cloud-config.

A value is used as given, or base64-decoded when it starts with ``base64:``; the result may be
gzip-compressed (as cloud-init itself accepts).  The decoded text is classified by cloud-init's own
rules (``cloudinit.handlers.type_from_starts_with`` plus its MIME test), so what we call a script
or a cloud-config is exactly what the guest will.

How our settings travel with the user's data (docs/seeding.md, "How our cloud-config and the user's are combined"):

* cloud-config: merged into one ``#cloud-config`` document; the user's values win, lists both
  sides set are joined (ours first), mappings are merged key by key.
* another kind cloud-init handles (script, ``#include``, jinja, boothook, part-handler, archive,
  MIME): a MIME multipart with the user's data first, untouched, and our cloud-config part last,
  carrying ``Merge-Type: dict(no_replace,recurse_list)+list(append)+str()`` so that cloud-init
  applies the same policy (the user's values win) when it merges the parts.
* anything else (free JSON, text for the guest's own programs): the user-data stays byte for byte
  what the user gave and our cloud-config goes into vendor-data, because wrapping it would change
  what the guest reads back.

Security: never put the value, or any part of it, into a message.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from email import message_from_bytes, message_from_string
from email.message import Message
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import yaml

from instance_cloudimage.runtime.errors import ParameterError

PARAM = "user_data"
# The value arrives in an environment variable (Linux caps one at 128 KiB), is stored in Ganeti's
# replicated config and served by metad; 64 KiB is four times EC2's 16 KiB and far above what
# cloud-config needs.  Decompressed, up to 1 MiB (gzip bombs stop there).
MAX_PARAM = 64 * 1024
MAX_DECODED = 1024 * 1024
BASE64_PREFIX = "base64:"
CLOUD_CONFIG_HEADER = "#cloud-config\n"
OUR_PART_NAME = "ganeti-instance-cloudimage.cfg"
# cloud-init's merger spec: keep the user's values, append to their lists, recurse into mappings.
OUR_MERGE_TYPE = "dict(no_replace,recurse_list)+list(append)+str()"
# Real cloud-configs nest a handful of levels; the YAML and JSON parsers (and yaml.safe_dump when
# we write the merged document) recurse once per level and hit Python's recursion limit at a few
# hundred, which must be a ParameterError, not a crash.
MAX_DEPTH = 100
# What yaml.safe_load raises for text it cannot build: a YAML error, a scalar that resolves but
# cannot be built (2001-02-30, an int of 5000 digits), or nesting beyond the recursion limit.
YAML_FAILURES = (yaml.YAMLError, ValueError, RecursionError)


class Kind(StrEnum):
    CLOUD_CONFIG = "text/cloud-config"
    SCRIPT = "text/x-shellscript"
    INCLUDE = "text/x-include-url"
    INCLUDE_ONCE = "text/x-include-once-url"
    JINJA = "text/jinja2"
    BOOTHOOK = "text/cloud-boothook"
    PART_HANDLER = "text/part-handler"
    ARCHIVE = "text/cloud-config-archive"
    JSONP = "text/cloud-config-jsonp"
    MIME = "multipart/mixed"
    OPAQUE = "text/plain"


# cloud-init's INCLUSION_TYPES_MAP, matched longest first on the lower-cased, left-stripped text.
_PREFIXES = sorted({
    "#include": Kind.INCLUDE,
    "#include-once": Kind.INCLUDE_ONCE,
    "#!": Kind.SCRIPT,
    "#cloud-config": Kind.CLOUD_CONFIG,
    "#part-handler": Kind.PART_HANDLER,
    "#cloud-boothook": Kind.BOOTHOOK,
    "#cloud-config-archive": Kind.ARCHIVE,
    "#cloud-config-jsonp": Kind.JSONP,
    "## template: jinja": Kind.JINJA,
}.items(), key=lambda item: -len(item[0]))

_HEADER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*:")

# Top-level keys that give away a cloud-config whose first line was forgotten (cloud-init would
# drop it without a word).
_TELLTALE_KEYS = {
    "bootcmd", "chpasswd", "disk_setup", "fqdn", "groups", "hostname", "manage_etc_hosts", "mounts",
    "package_update", "package_upgrade", "packages", "password", "runcmd", "ssh_authorized_keys",
    "ssh_pwauth", "timezone", "user", "users", "write_files", "apt", "ntp", "growpart", "resize_rootfs",
}


@dataclass(frozen=True)
class UserData:
    kind: Kind
    text: str
    config: Mapping[str, Any] | None = None  # the parsed mapping, for Kind.CLOUD_CONFIG only

    @property
    def handled_by_cloud_init(self) -> bool:
        return self.kind is not Kind.OPAQUE


def classify(text: str) -> Kind:
    """The content type cloud-init 22.4 gives this user-data.  ``user_data.convert_string`` parses
    anything with "mime-version:" in its first 4 KiB as a message, but when the first line is no
    header the email parser takes it all as one text/plain body, typed by its prefix again."""
    if "mime-version:" in text[:4096].lower() and _HEADER_RE.match(text):
        return Kind.MIME
    head = text.lower().lstrip()
    for prefix, kind in _PREFIXES:
        if head.startswith(prefix):
            return kind
    return Kind.OPAQUE


def _decode_bytes(value: str) -> bytes:
    if len(value.encode("utf-8", "surrogateescape")) > MAX_PARAM:
        raise ParameterError(f"{PARAM} is longer than {MAX_PARAM // 1024} KiB",
                             "keep it short and fetch the rest with #include or from the guest")
    if not value.startswith(BASE64_PREFIX):
        return value.encode("utf-8", "surrogateescape")
    body = "".join(value[len(BASE64_PREFIX):].split())
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ParameterError(f"{PARAM} starts with base64: but the rest is not valid base64") from None


def gunzip_bounded(data: bytes, what: str = PARAM) -> bytes:
    """gzip ``data`` decompressed, at most MAX_DECODED bytes (a gzip bomb stops there)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            out = f.read(MAX_DECODED + 1)
    except (OSError, EOFError, zlib.error):
        raise ParameterError(f"{what} is gzip data that does not decompress") from None
    if len(out) > MAX_DECODED:
        raise ParameterError(f"{what} decompresses to more than {MAX_DECODED // 1024} KiB")
    return out


def _too_deep() -> ParameterError:
    return ParameterError(f"{PARAM} is nested too deeply (more than {MAX_DEPTH} levels)")


def _depth(data: Any) -> int:
    """How many lists/mappings deep ``data`` goes (iteratively: it may be deeper than the stack)."""
    deepest = 0
    todo = [(data, 1)]
    seen: set[int] = set()
    while todo:
        item, level = todo.pop()
        if not isinstance(item, dict | list) or id(item) in seen:
            continue
        seen.add(id(item))  # YAML aliases share objects; each is walked once
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        children = list(item.keys()) + list(item.values()) if isinstance(item, dict) else item
        todo.extend((child, level + 1) for child in children)
    return deepest


def load_guest_mapping(data: bytes) -> dict[Any, Any] | None:
    """The mapping a seed file the guest may have written holds (YAML, or JSON, which is YAML);
    None when it holds something else or cannot be built."""
    try:
        value = yaml.safe_load(data)
    except YAML_FAILURES:
        return None
    return value if isinstance(value, dict) else None


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, with nesting beyond MAX_DEPTH (or the recursion limit) a ParameterError."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:  # a scalar YAML resolves but cannot build: 2001-02-30, an int of 5000 digits
        raise yaml.YAMLError("a value cannot be constructed") from None
    if _depth(data) > MAX_DEPTH:
        raise _too_deep()
    return data


def _check_cloud_config(text: str) -> Mapping[str, Any]:
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ParameterError(f"{PARAM} is a #cloud-config that is not valid YAML{where}",
                             "cloud-init would drop it") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ParameterError(f"{PARAM} is a #cloud-config whose YAML is not a mapping of names",
                             "cloud-init would drop it")
    return data


def _check_include(text: str) -> None:
    for n, line in enumerate(text.splitlines()[1:], 2):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        try:
            parts = urlsplit(entry)
        except ValueError:  # "http://[x": an unclosed IPv6 literal, or NFKC tricks in the host
            raise ParameterError(f"{PARAM}: #include line {n} is not a valid URL") from None
        if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.hostname):
            raise ParameterError(f"{PARAM}: #include line {n} is not an http(s):// or file:// URL")


def _check_other(kind: Kind, text: str) -> None:
    if kind in (Kind.INCLUDE, Kind.INCLUDE_ONCE):
        _check_include(text)
    elif kind is Kind.ARCHIVE:
        try:
            parts = _load_yaml(text)
        except yaml.YAMLError:
            parts = None
        if not isinstance(parts, list):
            raise ParameterError(f"{PARAM} is a #cloud-config-archive that is not a YAML list")
    elif kind is Kind.JINJA:
        body = text.lstrip().split("\n", 1)[1] if "\n" in text.lstrip() else ""
        if not body.lstrip().startswith(("#cloud-config", "#!", "{")):
            raise ParameterError(f"{PARAM} is a jinja template whose second line is neither #cloud-config nor #!",
                                 "cloud-init only renders templates of those two kinds")
    elif kind is Kind.MIME:
        msg = message_from_string(text)
        if msg.defects or (msg.get_content_type() == "text/plain" and not msg.get("Content-Type")):
            raise ParameterError(f"{PARAM} says MIME-Version but is not a well-formed MIME message")
    elif kind is Kind.OPAQUE:
        _check_opaque(text)


def _check_opaque(text: str) -> None:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            json.loads(text)
        except RecursionError:
            raise _too_deep() from None
        except ValueError:
            raise ParameterError(f"{PARAM} looks like JSON but does not parse as JSON") from None
        return
    try:
        data = yaml.safe_load(text)
    except YAML_FAILURES:
        return  # not cloud-config, whatever it is
    if isinstance(data, dict) and _TELLTALE_KEYS & {str(k) for k in data}:
        raise ParameterError(f"{PARAM} looks like cloud-config but does not start with #cloud-config",
                             "cloud-init ignores user-data without a header; add '#cloud-config' as line 1")


def decode_user_data(value: str) -> UserData | None:
    """Decode, classify and check the parameter; None when it is empty.  Raises ParameterError."""
    if not value.strip():
        return None
    data = _decode_bytes(value)
    if data[:2] == b"\x1f\x8b":
        data = gunzip_bounded(data)
    if len(data) > MAX_DECODED:
        raise ParameterError(f"{PARAM} is larger than {MAX_DECODED // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ParameterError(f"{PARAM} is not UTF-8 text", "binary user-data is not supported") from None
    if not text.strip():
        return None
    kind = classify(text)
    if kind is Kind.CLOUD_CONFIG:
        return UserData(kind, text, _check_cloud_config(text))
    _check_other(kind, text)
    return UserData(kind, text)


# --- merging and assembling -------------------------------------------------------------------

def merge_configs(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
    """One cloud-config from both: theirs wins, lists are joined (ours first), mappings merged."""
    merged: dict[str, Any] = dict(ours)
    for key, value in theirs.items():
        mine = merged.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            merged[key] = merge_configs(mine, value)
        elif isinstance(mine, list) and isinstance(value, list):
            merged[key] = mine + [v for v in value if v not in mine]
        else:
            merged[key] = value
    return merged


def render_cloud_config(cfg: Mapping[str, Any]) -> str:
    # Exactly "#cloud-config\n" first: flamingo checks that prefix byte for byte.
    return CLOUD_CONFIG_HEADER + yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False,
                                                allow_unicode=True, width=1 << 16)


def _part(content_type: str, text: str, filename: str, extra: Mapping[str, str]) -> str:
    headers = {"Content-Type": f'{content_type}; charset="utf-8"', "MIME-Version": "1.0"}
    if text.isascii():
        headers["Content-Transfer-Encoding"] = "7bit"
        body = text
    else:
        # cloud-init parses the message from a str; base64 keeps non-ASCII bytes exact.
        headers["Content-Transfer-Encoding"] = "base64"
        body = base64.encodebytes(text.encode("utf-8")).decode("ascii")
    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    headers.update(extra)
    return "".join(f"{k}: {v}\n" for k, v in headers.items()) + "\n" + body


def assemble_mime(user: UserData, ours: str) -> str:
    """multipart/mixed: the user's data first as it was given, our cloud-config last."""
    if user.kind is Kind.MIME:
        # Their message is nested whole: its own headers become the part's headers.
        first = user.text
    else:
        first = _part(user.kind.value, user.text, "user-data", {})
    second = _part(Kind.CLOUD_CONFIG.value, ours, OUR_PART_NAME, {"Merge-Type": OUR_MERGE_TYPE})
    seed = hashlib.sha256((first + second).encode("utf-8", "surrogateescape")).hexdigest()
    n = 0
    while True:
        boundary = f"===============ganeti{seed[:16]}{n}=="
        if boundary not in first and boundary not in second:
            break
        n += 1
    out = [f'Content-Type: multipart/mixed; boundary="{boundary}"\n', "MIME-Version: 1.0\n", "\n"]
    for part in (first, second):
        out.append(f"--{boundary}\n")
        # The newline before a delimiter belongs to the delimiter (RFC 2046 5.1.1): one more
        # keeps the part's last byte.
        out.append(part + "\n")
    out.append(f"--{boundary}--\n")
    return "".join(out)


@dataclass(frozen=True)
class UserDataOutput:
    user_data: str
    vendor_data: str | None = None


def assemble_for_cloud_init(ours: Mapping[str, Any], user: UserData | None) -> UserDataOutput:
    """user-data (and vendor-data) for cloud-init following the policy in the module docstring."""
    if user is None:
        return UserDataOutput(render_cloud_config(ours))
    if user.kind is Kind.CLOUD_CONFIG:
        return UserDataOutput(render_cloud_config(merge_configs(ours, user.config or {})))
    if user.handled_by_cloud_init:
        return UserDataOutput(assemble_mime(user, render_cloud_config(ours)))
    return UserDataOutput(user.text, render_cloud_config(ours))


def cloud_config_parts(data: bytes) -> tuple[Message | None, list[tuple[Message | None, bytes]]]:
    """The cloud-config inside a seed's user-data: ``(None, [(None, data)])`` for plain
    cloud-config, ``(message, [(part, payload), ...])`` for the text/cloud-config parts of a MIME
    multipart (edit a part and re-serialise the message), ``(None, [])`` for anything else."""
    head = data.lstrip()[:200].lower()
    if head.startswith(b"#cloud-config"):
        return None, [(None, data)]
    if b"content-type:" not in head or b"multipart" not in head:
        return None, []
    msg = message_from_bytes(data, policy=email.policy.compat32)
    parts: list[tuple[Message | None, bytes]] = []
    for part in msg.walk():
        payload = part.get_payload(decode=True) if part.get_content_type() == "text/cloud-config" else None
        if isinstance(payload, bytes):
            parts.append((part, payload))
    return msg, parts

