"""Local image paths: allowed directories only, no '..', no symlink escape."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import MappingProxyType

import pytest

from instance_cloudimage.runtime import localpath
from instance_cloudimage.runtime.errors import ChecksumMismatch, ParameterError
from instance_cloudimage.runtime.localpath import allowed_root, open_local_image, resolve_local_image_path
from instance_cloudimage.runtime.siteconfig import SITE_SETTINGS, Paths, SiteConfig


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "good.raw").write_bytes(b"disk")
    return d


@pytest.fixture
def site(tmp_path: Path, allowed: Path) -> SiteConfig:
    values = {s.dest: s.default for s in SITE_SETTINGS}
    values["allowed_dirs"] = (os.fspath(allowed),)
    return SiteConfig(paths=Paths(tmp_path / "etc", tmp_path / "cache"), values=MappingProxyType(values))


def test_a_file_in_an_allowed_directory(site: SiteConfig, allowed: Path) -> None:
    path = resolve_local_image_path(os.fspath(allowed / "good.raw"), site)
    assert path == allowed / "good.raw"
    assert allowed_root(path, site) == allowed
    fd = open_local_image(path, allowed)
    try:
        assert os.read(fd, 4) == b"disk"
    finally:
        os.close(fd)


def test_dotdot_is_refused_even_when_it_resolves_inside(site: SiteConfig, allowed: Path) -> None:
    (allowed / "sub").mkdir()
    with pytest.raises(ParameterError, match="must not contain '..'"):
        resolve_local_image_path(f"{allowed}/sub/../good.raw", site)
    with pytest.raises(ParameterError, match="must not contain '..'"):
        resolve_local_image_path(f"{allowed}/../secret", site)


def test_symlink_escaping_the_allowed_directory(site: SiteConfig, allowed: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host data")
    (allowed / "link.raw").symlink_to(secret)
    (allowed / "dirlink").symlink_to(tmp_path)
    for path in (allowed / "link.raw", allowed / "dirlink" / "secret"):
        with pytest.raises(ParameterError, match="outside the allowed image directories"):
            resolve_local_image_path(os.fspath(path), site)


def test_symlink_into_a_forbidden_root(site: SiteConfig, allowed: Path) -> None:
    (allowed / "hostname.raw").symlink_to("/etc/hostname")
    with pytest.raises(ParameterError, match="points into /etc"):
        resolve_local_image_path(os.fspath(allowed / "hostname.raw"), site)


def test_symlink_inside_the_allowed_directory_is_followed(site: SiteConfig, allowed: Path) -> None:
    (allowed / "alias.raw").symlink_to(allowed / "good.raw")
    assert resolve_local_image_path(os.fspath(allowed / "alias.raw"), site) == allowed / "good.raw"


def test_not_a_regular_file(site: SiteConfig, allowed: Path) -> None:
    os.mkfifo(allowed / "fifo.raw")
    with pytest.raises(ParameterError, match="not a regular file"):
        resolve_local_image_path(os.fspath(allowed / "fifo.raw"), site)
    with pytest.raises(ParameterError, match="must be absolute"):
        resolve_local_image_path("images/good.raw", site)


def test_open_refuses_a_symlink_swapped_in_after_the_check(allowed: Path, tmp_path: Path) -> None:
    checked = allowed / "good.raw"
    checked.unlink()
    checked.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ParameterError, match="cannot be opened"):
        open_local_image(checked, allowed)


# --- using a local file: in place when only root can change it, else a private copy -------------

def open_local_stream(site: SiteConfig, path: Path, checksum: str | None = None) -> tuple[object, ExitStack]:
    from instance_cloudimage.sources.fetch import ImageRef, open_image

    stack = ExitStack()
    ref = ImageRef(location=os.fspath(path), declared_format="auto", checksum=checksum, from_parameter=True)
    return open_image(ref, site, stack), stack


def read_all(stream: object) -> bytes:
    out = bytearray()
    while chunk := stream.read(1 << 20):  # type: ignore[attr-defined]
        out += chunk
    return bytes(out)


def test_root_only_file_is_used_in_place_through_its_descriptor(site: SiteConfig, allowed: Path,
                                                                 tmp_path: Path) -> None:
    image = allowed / "good.raw"
    image.chmod(0o644)
    stream, stack = open_local_stream(site, image)
    with stack:
        # The path is swapped after the checks: the stream and the file handed on keep the checked inode.
        (tmp_path / "evil").write_bytes(b"evil")
        os.replace(tmp_path / "evil", image)
        assert stream.local_path is not None  # type: ignore[attr-defined]
        fetched = stream.finish()  # type: ignore[attr-defined]
        assert fetched.path.read_bytes() == b"disk"
        assert read_all(stream) == b"disk"
        assert fetched.digest == "sha256:" + hashlib.sha256(b"disk").hexdigest()
        assert not (site.paths.cache_dir / "tmp").exists()  # no copy was made


def test_root_only_file_with_a_wrong_checksum_never_ends_well(site: SiteConfig, allowed: Path) -> None:
    image = allowed / "good.raw"
    image.chmod(0o644)
    stream, stack = open_local_stream(site, image, "sha256:" + hashlib.sha256(b"other").hexdigest())
    with stack:
        with pytest.raises(ChecksumMismatch):
            read_all(stream)
        with pytest.raises(ChecksumMismatch):
            stream.finish()  # type: ignore[attr-defined]


def test_root_only_file_with_a_right_sha512_checksum(site: SiteConfig, allowed: Path) -> None:
    image = allowed / "good.raw"
    image.chmod(0o600)
    stream, stack = open_local_stream(site, image, "sha512:" + hashlib.sha512(b"disk").hexdigest())
    with stack:
        assert read_all(stream) == b"disk"
        assert stream.finish().digest == "sha256:" + hashlib.sha256(b"disk").hexdigest()  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_file_others_can_change_is_copied_first(site: SiteConfig, allowed: Path, mode: int,
                                                caplog: pytest.LogCaptureFixture) -> None:
    image = allowed / "good.raw"
    image.chmod(mode)
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        stream, stack = open_local_stream(site, image)
    with stack:
        assert read_all(stream) == b"disk"
        assert stream.local_path is None  # type: ignore[attr-defined]
        fetched = stream.finish()  # type: ignore[attr-defined]
        with open(image, "wb") as f:  # changed in place after it was read
            f.write(b"evil")
        assert fetched.path.parent == site.paths.cache_dir / "tmp"
        assert fetched.path.read_bytes() == b"disk"
    assert "copying the image file first: users other than root can change it" in caplog.text


def libc_renameat2() -> Callable[[str, str], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    rename_exchange = 2

    def exchange(a: str, b: str) -> None:
        if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), rename_exchange) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return exchange


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
def test_a_directory_swapped_for_a_symlink_never_opens_outside(
        site: SiteConfig, allowed: Path, tmp_path: Path, openat2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who can write below an allowed directory swaps a real subdirectory with a symlink
    to a directory outside (renameat2 RENAME_EXCHANGE) in a loop while images are opened: no open
    may ever read the outside file, and every failure is one ParameterError line."""
    if not openat2:
        monkeypatch.setattr(localpath, "SYS_OPENAT2", -1)  # ENOSYS: the component walk
    secret_dir = tmp_path / "private"
    secret_dir.mkdir()
    (secret_dir / "disk.raw").write_bytes(b"SECRET")
    (allowed / "sub").mkdir()
    (allowed / "sub" / "disk.raw").write_bytes(b"public")
    (allowed / "swap").symlink_to(secret_dir)
    exchange = libc_renameat2()
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            exchange(os.fspath(allowed / "sub"), os.fspath(allowed / "swap"))
            swaps += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    seen: dict[str, int] = {}
    try:
        for _ in range(20000):
            try:
                path = resolve_local_image_path(os.fspath(allowed / "sub" / "disk.raw"), site)
                fd = open_local_image(path, allowed_root(path, site))
            except ParameterError as e:
                assert "\n" not in str(e) and "private" not in str(e)
                seen["refused"] = seen.get("refused", 0) + 1
                continue
            try:
                data = os.read(fd, 16)
            finally:
                os.close(fd)
            seen[data.decode()] = seen.get(data.decode(), 0) + 1
    finally:
        stop.set()
        thread.join()
    assert "SECRET" not in seen, seen
    assert swaps > 100 and seen.get("public", 0) > 0, (swaps, seen)


def test_the_component_walk_refuses_a_symlinked_directory(allowed: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localpath, "SYS_OPENAT2", -1)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "disk.raw").write_bytes(b"SECRET")
    (allowed / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ParameterError, match="image file cannot be opened"):
        open_local_image(allowed / "link" / "disk.raw", allowed)
