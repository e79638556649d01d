"""OpenSSH public keys from the ``ssh_authorized_keys`` OS parameter.

Entries are separated by newlines or ';' (gber's provider documented ',' but split on ';'; a
comma can appear inside options, a ';' can appear nowhere we accept).  Each entry is one
``authorized_keys`` line: ``[options] type base64 [comment]``.  The base64 body must decode to
an SSH wire blob whose embedded type name equals the declared one and whose fields are complete,
so a truncated paste is refused here instead of being silently ignored by sshd at first boot.

Security: messages name the entry by its position, never by its content.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass

from instance_cloudimage.runtime.errors import ParameterError

PARAM = "ssh_authorized_keys"
MAX_KEYS = 100
MAX_ENTRY = 16 * 1024  # an RSA-16384 certificate with principals still fits

# Field layout after the type name, for plain keys: "s" = string, "m" = mpint.
_PLAIN: dict[str, str] = {
    "ssh-rsa": "mm",                       # e, n
    "ssh-ed25519": "s",                    # 32-byte key
    "ecdsa-sha2-nistp256": "ss",           # curve name, point
    "ecdsa-sha2-nistp384": "ss",
    "ecdsa-sha2-nistp521": "ss",
    "sk-ecdsa-sha2-nistp256@openssh.com": "sss",  # curve, point, application
    "sk-ssh-ed25519@openssh.com": "ss",           # key, application
}
_CERT_SUFFIX = "-cert-v01@openssh.com"
_CERTS = {
    "ssh-rsa-cert-v01@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
}
KEY_TYPES = frozenset(_PLAIN) | frozenset(_CERTS)
# Types OpenSSH has dropped: refusing them here beats a key that silently never works.
_REFUSED = {
    "ssh-dss": "DSA keys are no longer accepted by OpenSSH (removed in 9.8); use ed25519",
    "ssh-dss-cert-v01@openssh.com": "DSA certificates are no longer accepted by OpenSSH; use ed25519",
}

# authorized_keys options (sshd(8) AUTHORIZED_KEYS FILE FORMAT); '=' marks a quoted value.
_FLAG_OPTIONS = {
    "agent-forwarding", "cert-authority", "no-agent-forwarding", "no-port-forwarding", "no-pty",
    "no-user-rc", "no-x11-forwarding", "port-forwarding", "pty", "restrict", "user-rc",
    "x11-forwarding", "no-touch-required", "verify-required",
}
_VALUE_OPTIONS = {
    "command", "environment", "expiry-time", "from", "permitlisten", "permitopen", "principals", "tunnel",
}
_OPTION_RE = re.compile(r'([A-Za-z0-9-]+)(="(?:[^"\\]|\\.)*")?(?:,|(?=\s)|$)')
_CURVES = {"ecdsa-sha2-nistp256": b"nistp256", "ecdsa-sha2-nistp384": b"nistp384",
           "ecdsa-sha2-nistp521": b"nistp521", "sk-ecdsa-sha2-nistp256@openssh.com": b"nistp256"}


@dataclass(frozen=True)
class PublicKey:
    options: str
    type: str
    body: str
    comment: str

    @property
    def line(self) -> str:
        """The authorized_keys line, normalised to single spaces."""
        return " ".join(p for p in (self.options, self.type, self.body, self.comment) if p)


def _fail(index: int, why: str, hint: str | None = None) -> ParameterError:
    return ParameterError(f"{PARAM}: entry {index} {why}", hint)


def _read_string(blob: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(blob):
        raise ValueError("truncated")
    (n,) = struct.unpack(">I", blob[pos:pos + 4])
    end = pos + 4 + n
    if end > len(blob):
        raise ValueError("truncated")
    return blob[pos + 4:end], end


def _check_blob(key_type: str, blob: bytes) -> None:
    """Raise ValueError unless ``blob`` is a complete key of ``key_type``."""
    name, pos = _read_string(blob, 0)
    if name != key_type.encode():
        raise ValueError("type mismatch")
    if key_type in _CERTS:
        # nonce, then the embedded public key; the rest (serial, principals, CA signature) is
        # sshd's to judge.  A certificate is at least nonce + key + trailer.
        _nonce, pos = _read_string(blob, pos)
        if len(blob) - pos < 64:
            raise ValueError("truncated")
        return
    fields = []
    for _kind in _PLAIN[key_type]:
        value, pos = _read_string(blob, pos)
        fields.append(value)
    if pos != len(blob):
        raise ValueError("trailing data")
    if key_type in ("ssh-ed25519", "sk-ssh-ed25519@openssh.com") and len(fields[0]) != 32:
        raise ValueError("bad ed25519 key length")
    if key_type in _CURVES and fields[0] != _CURVES[key_type]:
        raise ValueError("curve mismatch")
    if key_type == "ssh-rsa":
        modulus = fields[1].lstrip(b"\0")
        if len(modulus) * 8 < 1024:
            raise ValueError("RSA key shorter than 1024 bits")


def _split_options(index: int, entry: str) -> tuple[str, str]:
    """Split ``[options] rest``; options are only accepted from sshd's list."""
    first = entry.split(None, 1)[0]
    looks_like_options = "=" in first or "," in first or first.lower() in _FLAG_OPTIONS
    if first in KEY_TYPES or first in _REFUSED or not looks_like_options:
        return "", entry
    pos = 0
    while True:
        m = _OPTION_RE.match(entry, pos)
        if not m:
            raise _fail(index, "has malformed options", "options are name or name=\"value\", comma-separated")
        name, has_value = m.group(1).lower(), bool(m.group(2))
        known = (name in _FLAG_OPTIONS and not has_value) or (name in _VALUE_OPTIONS and has_value)
        if not known:
            raise _fail(index, "has an option sshd does not know or uses it wrongly")
        pos = m.end()
        if pos >= len(entry) or entry[pos].isspace():
            break
    options, rest = entry[:pos].rstrip(","), entry[pos:].strip()
    if not rest:
        raise _fail(index, "has options but no key")
    return options, rest


def parse_key(index: int, entry: str) -> PublicKey:
    """Parse one authorized_keys entry; raises ParameterError naming the entry's position."""
    if len(entry) > MAX_ENTRY:
        raise _fail(index, f"is longer than {MAX_ENTRY} characters")
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in entry):
        raise _fail(index, "contains control characters")
    if "PRIVATE KEY" in entry:
        raise _fail(index, "looks like a PRIVATE key", "give the .pub file; and replace that key, it has been exposed")
    if entry.startswith("---- BEGIN SSH2"):
        raise _fail(index, "is in RFC 4716 format", "convert it with ssh-keygen -i -f KEY.pub")
    options, rest = _split_options(index, entry)
    parts = rest.split(None, 2)
    key_type = parts[0]
    if key_type in _REFUSED:
        raise _fail(index, "is refused: " + _REFUSED[key_type])
    if key_type not in KEY_TYPES:
        raise _fail(index, "does not start with a known key type",
                    "expected e.g. ssh-ed25519, ecdsa-sha2-nistp256, sk-ssh-ed25519@openssh.com, ssh-rsa "
                    "or a *-cert-v01@openssh.com certificate")
    if len(parts) < 2:
        raise _fail(index, "has no key data after its type")
    body = parts[1]
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise _fail(index, "has key data that is not valid base64") from None
    try:
        _check_blob(key_type, blob)
    except ValueError as e:
        raise _fail(index, f"has key data that does not match its type ({e})",
                    "copy the whole line from the .pub file") from None
    comment = parts[2].strip() if len(parts) > 2 else ""
    return PublicKey(options=options, type=key_type, body=body, comment=comment)


def split_entries(value: str) -> list[str]:
    return [e.strip() for e in re.split(r"[;\r\n]+", value) if e.strip() and not e.strip().startswith("#")]


def parse_authorized_keys(value: str) -> tuple[PublicKey, ...]:
    """All keys of the parameter, duplicates (same type and body) dropped, order kept."""
    entries = split_entries(value)
    if not entries:
        raise ParameterError(f"{PARAM} holds no key", "give one or more OpenSSH public keys")
    if len(entries) > MAX_KEYS:
        raise ParameterError(f"{PARAM} holds {len(entries)} keys; at most {MAX_KEYS} are accepted")
    keys: list[PublicKey] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(entries, 1):
        key = parse_key(i, entry)
        if (key.type, key.body) not in seen:
            seen.add((key.type, key.body))
            keys.append(key)
    return tuple(keys)
