"""Disk URIs (Ganeti's ``access=userspace``): which are accepted, and how they are shown.

Ganeti passes ``DISK_N_URI`` (and ``IMPORT_DISK_URI``/``EXPORT_DISK_URI``) with what the kvm
hypervisor would hand qemu as ``-drive file=``: ``rbd:pool/image``, ``gluster://host:port/vol/path``,
or whatever an ExtStorage provider's attach script printed after ``kvm:``.  Copying through such
a URI is the disk wing's (disk/uri.py); this module only parses.

Security: the URI is configuration from Ganeti, but qemu-img reads a file name's prefix as a
protocol: ``file:`` or a plain path reaches host files, ``json:`` nests arbitrary options,
``vvfat:`` exports a host directory, ``blkdebug:`` reads a host config file.  Only the network
protocols that Ganeti and ExtStorage providers use are accepted, and the URI is only ever an
argv element, never shell text.  A URI may carry a credential (rbd ``:key=``, an iSCSI password):
it is shown only in redacted form, and the secret parts are registered with log.hide_values so
that not even qemu-img's error messages can show them.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, unquote, urlsplit

from instance_cloudimage.runtime.errors import EnvironmentError_
from instance_cloudimage.runtime.log import hide_values

log = logging.getLogger(__name__)

# qemu block drivers' protocol names (bdrv_find_protocol matches the text before the first ':').
PROTOCOLS = ("rbd", "gluster", "gluster+tcp", "gluster+unix", "gluster+rdma", "nbd", "nbd+tcp", "nbd+unix",
             "iscsi", "iser", "nfs", "ssh")
# Like qemu's path_has_protocol(): a protocol is what precedes a ':' that comes before any '/' or '\'.
PROTOCOL_RE = re.compile(r"^([^:/\\]*):")
SHOWN_PROTOCOL_RE = re.compile(r"^[A-Za-z0-9+._-]{1,24}$")
SECRET_WORDS = ("key", "secret", "password", "passwd", "token", "auth")
REDACTED = "***"


def uri_protocol(uri: str) -> str | None:
    m = PROTOCOL_RE.match(uri)
    return m.group(1) if m else None


def check_uri(uri: str, variable: str) -> None:
    """Refuse a URI qemu-img would read as a host path or option string.  Raises EnvironmentError_."""
    protocol = uri_protocol(uri)
    if protocol in PROTOCOLS and uri.isprintable() and uri == uri.strip():
        hide_values(uri_secrets(uri))
        return
    if protocol is None:
        what = "a plain path, not a URI"
    elif SHOWN_PROTOCOL_RE.match(protocol):
        what = f"the {protocol!r} protocol"
    else:
        what = "an unreadable protocol"
    if protocol in PROTOCOLS:
        what = "control characters or surrounding blanks"
    raise EnvironmentError_(f"${variable} has {what}, which this provider does not open",
                            f"supported: {', '.join(p + ':' for p in PROTOCOLS)}")


def _is_secret(name: str) -> bool:
    return any(w in name.lower() for w in SECRET_WORDS)


def _rbd_options(uri: str) -> list[str]:
    """rbd:pool/image[@snap][:opt=value]... split on the ':' qemu splits on (not backslash-escaped)."""
    return re.split(r"(?<!\\):", uri)


def uri_secrets(uri: str) -> list[str]:
    """The credentials inside ``uri`` (rbd key options, URL passwords and secret query values)."""
    if uri_protocol(uri) == "rbd":
        parts = (p.partition("=") for p in _rbd_options(uri)[2:])
        return [v for name, eq, v in parts if eq and v and _is_secret(name)]
    try:
        url = urlsplit(uri)
        password = url.password
    except ValueError:
        return []
    secrets = [v for k, v in parse_qsl(url.query, keep_blank_values=True) if v and _is_secret(k)]
    user = url.username or ""
    if "%" in user:  # libiscsi: iscsi://user%password@host/...
        secrets.append(user.partition("%")[2])
    return [s for s in (password, *secrets) if s]


def redact_uri(uri: str) -> str:
    """``uri`` fit for a log line: credentials replaced by ***."""
    if uri_protocol(uri) == "rbd":
        parts = _rbd_options(uri)
        out = parts[:2]
        for p in parts[2:]:
            name, eq, value = p.partition("=")
            out.append(f"{name}={REDACTED}" if eq and value and _is_secret(name) else p)
        return ":".join(out)
    try:
        url = urlsplit(uri)
        url.port  # noqa: B018 - raises ValueError for a malformed netloc
    except ValueError:
        return f"{uri_protocol(uri)}:{REDACTED}"
    # Edited as text: urlunsplit() would drop an empty authority (nbd+unix:///disk becomes nbd+unix:/disk).
    shown = uri
    if "@" in url.netloc:
        userinfo, _, host = url.netloc.rpartition("@")
        user = re.split(r"[:%]", userinfo, maxsplit=1)[0]
        if user != userinfo:
            shown = shown.replace(url.netloc, f"{user}:{REDACTED}@{host}", 1)
    if url.query:
        pairs = [p.partition("=") for p in url.query.split("&")]
        query = "&".join(f"{k}={REDACTED}" if eq and _is_secret(unquote(k)) else k + eq + v for k, eq, v in pairs)
        shown = shown.replace("?" + url.query, "?" + query, 1)
    return shown
