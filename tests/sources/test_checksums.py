"""Checksum files (unit) and their OpenPGP signatures (gpg keys made in the test)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import ChecksumMismatch, ConfigError, UnsafeImage
from instance_cloudimage.runtime.siteconfig import Paths, load_site_config
from instance_cloudimage.sources.checksums import Digest, lookup_required, parse_checksum_file
from instance_cloudimage.sources.fetch import ImageRef, fetch_image
from instance_cloudimage.sources.signature import dearmor, strip_clearsign
from tests.support.httpfixtures import ServerState, write_site

A = "a" * 64
B = "b" * 64
C = "c" * 128


def test_gnu_format_text_and_binary_markers() -> None:
    cl = parse_checksum_file(f"{A}  debian-13-generic-amd64.qcow2\n{B} *debian-13-generic-arm64.qcow2\n", "SUMS")
    assert cl.lookup("debian-13-generic-amd64.qcow2") == Digest("sha256", A)
    assert cl.lookup("debian-13-generic-arm64.qcow2") == Digest("sha256", B)
    assert cl.lookup("generic-amd64.qcow2") is None  # exact names only, no substring match


def test_bsd_format_and_comments() -> None:
    text = ("# Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2: 123 bytes\n"
            f"SHA256 (Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2) = {A.upper()}\n"
            f"SHA512 (Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2) = {C}\n"
            "MD5 (Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2) = 0123456789abcdef0123456789abcdef\n")
    cl = parse_checksum_file(text, "CHECKSUM")
    assert cl.lookup("Fedora-Cloud-Base-Generic-44-1.7.x86_64.qcow2") == Digest("sha512", C)  # strongest


def test_bare_hash() -> None:
    assert parse_checksum_file(f"{A}\n", "x.sha256").lookup("anything.img") == Digest("sha256", A)


def test_two_hashes_for_one_name_are_refused() -> None:
    with pytest.raises(ChecksumMismatch, match="two different sha256 hashes for img.qcow2"):
        parse_checksum_file(f"{A}  img.qcow2\n{B}  ./img.qcow2\n", "SUMS")
    assert parse_checksum_file(f"{A}  img.qcow2\n{A} *img.qcow2\n", "SUMS").lookup("img.qcow2")


def test_md5_and_sha1_only_lists_give_nothing() -> None:
    cl = parse_checksum_file("0123456789abcdef0123456789abcdef  img.qcow2\n", "MD5SUMS")
    with pytest.raises(ChecksumMismatch, match="no SHA-256/SHA-512 entry for img.qcow2"):
        lookup_required(cl, ["img.qcow2"])


def test_pick_uses_natural_version_order() -> None:
    cl = parse_checksum_file(f"{A}  img-1.9.qcow2\n{B}  img-1.10.qcow2\n{A}  other-2.0.qcow2\n", "SUMS")
    assert cl.pick("img-*.qcow2") == "img-1.10.qcow2"
    with pytest.raises(ConfigError):
        cl.pick("nothing-*")


def test_unverified_clearsigned_text_is_stripped() -> None:
    text = ("-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
            f"SHA256 (img.qcow2) = {A}\n- -dash escaped\n-----BEGIN PGP SIGNATURE-----\n\nabc\n"
            "-----END PGP SIGNATURE-----\n")
    body = strip_clearsign(text)
    assert body == f"SHA256 (img.qcow2) = {A}\n-dash escaped"


def test_dearmor_ignores_binary_and_decodes_armor() -> None:
    assert dearmor(b"\x99\x01\x0d") is None
    armored = (b"-----BEGIN PGP PUBLIC KEY BLOCK-----\nComment: x\n\naGVsbG8=\n=abcd\n"
               b"-----END PGP PUBLIC KEY BLOCK-----\n")
    assert dearmor(armored) == b"hello"


# --- signatures with real keys ---------------------------------------------------------------------

def gpg(home: Path, *args: str, input: bytes | None = None) -> bytes:
    env = {**os.environ, "GNUPGHOME": os.fspath(home)}
    return subprocess.run(["gpg", "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", "", *args],
                          env=env, input=input, check=True, capture_output=True).stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two signing keys, each in its own GNUPGHOME, and their public keyrings."""
    out: dict[str, Path] = {}
    homes = []
    for name in ("good", "evil"):
        home = tmp_path_factory.mktemp(f"gnupg-{name}")
        home.chmod(0o700)
        gpg(home, "--quick-gen-key", f"{name} <{name}@example.org>", "ed25519", "sign", "never")
        ring = home.parent / f"{name}.gpg"
        ring.write_bytes(gpg(home, "--export"))
        (home.parent / f"{name}.asc").write_bytes(gpg(home, "--armor", "--export"))
        out[name] = home
        out[f"{name}-ring"] = ring
        out[f"{name}-asc"] = home.parent / f"{name}.asc"
        homes.append(home)
    yield out
    for home in homes:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env={**os.environ, "GNUPGHOME": os.fspath(home)},
                       check=False)


IMAGE = os.urandom(300_000)
SUMS = f"{hashlib.sha256(IMAGE).hexdigest()}  img.raw\n".encode()


def fetch_with(tmp_path: Path, state: ServerState, keyring: Path, signature_url: str) -> str:
    state.files["/img.raw"] = IMAGE
    site = load_site_config(Paths(write_site(tmp_path / "etc"), tmp_path / "cache"))
    ref = ImageRef(location=state.url("/img.raw"), declared_format="auto", checksum=None,
                   checksum_url=state.url("/SUMS"), signature_url=signature_url, keyring=os.fspath(keyring),
                   variant="signed")
    with ExitStack() as stack:
        return fetch_image(ref, site, stack).digest


@pytest.mark.integration
def test_detached_signature_by_the_keyring_key_is_accepted(tmp_path: Path, state: ServerState,
                                                           keys: dict[str, Path]) -> None:
    state.files["/SUMS"] = SUMS
    state.files["/SUMS.gpg"] = gpg(keys["good"], "--detach-sign", input=SUMS)
    assert fetch_with(tmp_path, state, keys["good-ring"], state.url("/SUMS.gpg")) == \
        "sha256:" + hashlib.sha256(IMAGE).hexdigest()
    # An ASCII-armored keyring (as distributions publish keys) works too.
    assert fetch_with(tmp_path / "2", state, keys["good-asc"], state.url("/SUMS.gpg"))


@pytest.mark.integration
def test_signature_by_another_key_is_rejected(tmp_path: Path, state: ServerState, keys: dict[str, Path]) -> None:
    state.files["/SUMS"] = SUMS
    state.files["/SUMS.gpg"] = gpg(keys["evil"], "--detach-sign", input=SUMS)
    with pytest.raises(UnsafeImage, match="signed by a key that is not in the variant's keyring"):
        fetch_with(tmp_path, state, keys["good-ring"], state.url("/SUMS.gpg"))
    assert state.body_gets("/img.raw") == []  # the image is not even requested


@pytest.mark.integration
def test_modified_checksum_file_is_rejected(tmp_path: Path, state: ServerState, keys: dict[str, Path]) -> None:
    state.files["/SUMS.gpg"] = gpg(keys["good"], "--detach-sign", input=SUMS)
    state.files["/SUMS"] = SUMS.replace(b"img.raw", b"img.RAW") + b"\n"
    with pytest.raises(UnsafeImage, match="signature check of checksum file .* failed"):
        fetch_with(tmp_path, state, keys["good-ring"], state.url("/SUMS.gpg"))


@pytest.mark.integration
def test_clearsigned_checksum_file(tmp_path: Path, state: ServerState, keys: dict[str, Path]) -> None:
    signed = gpg(keys["good"], "--clearsign", input=SUMS)
    state.files["/SUMS"] = signed
    assert fetch_with(tmp_path, state, keys["good-ring"], "inline").startswith("sha256:")
    # Lines added outside the signed part are not believed.
    state.files["/SUMS"] = f"{'0' * 64}  img.raw\n".encode() + signed
    with pytest.raises(UnsafeImage, match="not clear-signed"):
        fetch_with(tmp_path / "2", state, keys["good-ring"], "inline")
    state.files["/SUMS"] = gpg(keys["evil"], "--clearsign", input=SUMS)
    with pytest.raises(UnsafeImage, match="not in the variant's keyring"):
        fetch_with(tmp_path / "3", state, keys["good-ring"], "inline")


@pytest.mark.integration
def test_image_not_matching_the_signed_checksum_is_refused(tmp_path: Path, state: ServerState,
                                                           keys: dict[str, Path]) -> None:
    sums = f"{'0' * 64}  img.raw\n".encode()
    state.files["/SUMS"] = sums
    state.files["/SUMS.gpg"] = gpg(keys["good"], "--detach-sign", input=sums)
    with pytest.raises(ChecksumMismatch):
        fetch_with(tmp_path, state, keys["good-ring"], state.url("/SUMS.gpg"))
    assert not [p for p in (tmp_path / "cache" / "images").iterdir() if p.suffix != ".json"]
