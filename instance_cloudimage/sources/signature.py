"""OpenPGP signatures of checksum files, checked with ``gpgv`` against the variant's keyring.

gpgv needs no GnuPG home and trusts exactly the keys in ``--keyring``.  Binary keyrings (as in
/usr/share/keyrings) are used as they are; ASCII-armored key files (as distributions publish
them) are de-armored into a private temporary file first.  For a clear-signed file the text
we parse is the one gpgv writes out (what was signed), never the file as downloaded, so text
outside the signed part cannot slip in.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from pathlib import Path

from instance_cloudimage.runtime.errors import CommandError, ConfigError, UnsafeImage
from instance_cloudimage.runtime.process import run
from instance_cloudimage.runtime.siteconfig import SiteConfig

ARMOR_RE = re.compile(rb"-----BEGIN PGP PUBLIC KEY BLOCK-----\r?\n(.*?)-----END PGP PUBLIC KEY BLOCK-----", re.S)
CLEARSIGN_HEADER = "-----BEGIN PGP SIGNED MESSAGE-----"
GPGV_TIMEOUT = 60


def keyring_path(keyring: str, site: SiteConfig) -> Path:
    """Absolute, or relative to the site configuration directory.  Raises ConfigError."""
    path = Path(keyring) if os.path.isabs(keyring) else site.paths.config_dir / keyring
    if not path.is_file():
        raise ConfigError(f"keyring {path} does not exist",
                          "install the distribution's keyring package or fix the variant's Keyring")
    return path


def dearmor(data: bytes) -> bytes | None:
    """The binary form of ASCII-armored public keys, or None when ``data`` is not armored."""
    blocks = ARMOR_RE.findall(data)
    if not blocks:
        return None
    out = b""
    for block in blocks:
        lines = block.decode("ascii", errors="replace").splitlines()
        # Armor headers ("Comment: ...") end at the first blank line.
        if "" in lines and all(":" in line for line in lines[:lines.index("")]):
            lines = lines[lines.index("") + 1:]
        body = "".join(line.strip() for line in lines if line.strip() and not line.startswith("="))
        try:
            out += base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("keyring file has a malformed ASCII-armored key") from None
    return out


class Verifier:
    """gpgv against one keyring; temporary files live in ``workdir``."""

    def __init__(self, keyring: Path, workdir: Path) -> None:
        self.workdir = workdir
        data = keyring.read_bytes()
        binary = dearmor(data)
        if binary is not None:
            fd, name = tempfile.mkstemp(dir=workdir, prefix="keyring-", suffix=".gpg")
            with os.fdopen(fd, "wb") as f:
                f.write(binary)
            self.keyring = Path(name)
        else:
            self.keyring = keyring

    def _gpgv(self, args: list[str], what: str) -> None:
        argv = ["gpgv", "--quiet", "--status-fd", "1", "--keyring", os.fspath(self.keyring), *args]
        try:
            out = run(argv, timeout=GPGV_TIMEOUT).stdout.decode(errors="replace")
        except CommandError as e:
            reason = "no valid signature by a key in the variant's keyring"
            if "NO_PUBKEY" in e.stderr or "No public key" in e.stderr:
                reason = "it is signed by a key that is not in the variant's keyring"
            elif "BAD signature" in e.stderr or "BADSIG" in e.stderr:
                reason = "the signature is bad (the file was modified)"
            raise UnsafeImage(f"signature check of {what} failed: {reason}") from None
        if "[GNUPG:] VALIDSIG" not in out:
            raise UnsafeImage(f"signature check of {what} failed: gpgv reported no valid signature")

    def verify_detached(self, data: bytes, signature: bytes, what: str) -> None:
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix="gpgv-") as tmp:
            d, s = Path(tmp) / "data", Path(tmp) / "data.sig"
            d.write_bytes(data)
            s.write_bytes(signature)
            self._gpgv([os.fspath(s), os.fspath(d)], what)

    def verify_clearsigned(self, data: bytes, what: str) -> bytes:
        """Check a clear-signed file and return the signed text."""
        if not data.lstrip().startswith(CLEARSIGN_HEADER.encode()):
            raise UnsafeImage(f"{what} is not clear-signed", "set SignatureURL to the detached signature's URL")
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix="gpgv-") as tmp:
            src, out = Path(tmp) / "signed.asc", Path(tmp) / "signed.txt"
            src.write_bytes(data)
            self._gpgv(["--output", os.fspath(out), os.fspath(src)], what)
            return out.read_bytes()

    def close(self) -> None:
        if self.keyring.parent == self.workdir:
            self.keyring.unlink(missing_ok=True)


def strip_clearsign(text: str) -> str:
    """The body of a clear-signed file, for a variant that does not check the signature."""
    if not text.lstrip().startswith(CLEARSIGN_HEADER):
        return text
    lines = text.splitlines()
    try:
        start = lines.index("") + 1
    except ValueError:
        return text
    body = []
    for line in lines[start:]:
        if line.startswith("-----BEGIN PGP SIGNATURE-----"):
            break
        body.append(line[2:] if line.startswith("- ") else line)
    return "\n".join(body)
