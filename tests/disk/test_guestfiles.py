"""guestfiles: writing into an untrusted tree never follows what the image planted (no root needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from instance_cloudimage.disk.guestfiles import (
    guest_dir,
    read_guest_file,
    split_guest_path,
    write_guest_file,
)
from instance_cloudimage.runtime.errors import SeedError, UnsafeImage

ME = {"uid": os.getuid(), "gid": os.getgid()}


@pytest.fixture()
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    (root / "var/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    return root


@pytest.fixture()
def host(tmp_path: Path) -> Path:
    h = tmp_path / "host-etc"
    h.mkdir()
    (h / "passwd").write_text("host file\n")
    return h


def test_creates_missing_directories_private(guest: Path) -> None:
    with guest_dir(guest, "var/lib/cloud/seed/nocloud", create=True, **ME) as d:
        write_guest_file(d, "meta-data", b"instance-id: x\n", **ME)
    for sub in ("var/lib/cloud", "var/lib/cloud/seed", "var/lib/cloud/seed/nocloud"):
        assert stat.S_IMODE((guest / sub).stat().st_mode) == 0o700
    f = guest / "var/lib/cloud/seed/nocloud/meta-data"
    assert f.read_bytes() == b"instance-id: x\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert not list((guest / "var/lib/cloud/seed/nocloud").glob(".*"))  # no temporary left


@pytest.mark.parametrize("link_at", ["var/lib/cloud", "var/lib/cloud/seed", "var"])
def test_absolute_symlink_on_the_way_is_refused(guest: Path, host: Path, link_at: str) -> None:
    target = guest / link_at
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.fspath(host), target)
    with pytest.raises(UnsafeImage, match="symbolic link"):
        with guest_dir(guest, "var/lib/cloud/seed/nocloud", create=True, **ME) as d:
            write_guest_file(d, "passwd", b"owned\n", **ME)
    assert (host / "passwd").read_text() == "host file\n"
    assert sorted(p.name for p in host.iterdir()) == ["passwd"]


def test_relative_symlink_is_refused_too(guest: Path) -> None:
    os.symlink("../../etc", guest / "var/lib/cloud")
    with pytest.raises(UnsafeImage):
        with guest_dir(guest, "var/lib/cloud/seed", create=True, **ME):
            pass


def test_symlinked_file_is_replaced_not_followed(guest: Path, host: Path) -> None:
    os.symlink(os.fspath(host / "passwd"), guest / "etc/hostname")
    with guest_dir(guest, "etc") as etc:
        write_guest_file(etc, "hostname", b"vm1\n", mode=0o644, **ME)
    assert (host / "passwd").read_text() == "host file\n"
    assert not (guest / "etc/hostname").is_symlink()
    assert (guest / "etc/hostname").read_text() == "vm1\n"
    assert stat.S_IMODE((guest / "etc/hostname").stat().st_mode) == 0o644


def test_fifo_and_hard_link_are_replaced(guest: Path) -> None:
    os.mkfifo(guest / "etc/fifo")
    (guest / "etc/shadow").write_text("secret\n")
    os.link(guest / "etc/shadow", guest / "etc/linked")
    with guest_dir(guest, "etc") as etc:
        write_guest_file(etc, "fifo", b"a", **ME)
        write_guest_file(etc, "linked", b"b", **ME)
    assert (guest / "etc/fifo").read_bytes() == b"a"
    assert (guest / "etc/shadow").read_text() == "secret\n"
    assert (guest / "etc/linked").read_bytes() == b"b"


def test_directory_in_place_of_file_is_refused(guest: Path) -> None:
    (guest / "etc/hostname").mkdir()
    with guest_dir(guest, "etc") as etc, pytest.raises(UnsafeImage, match="directory"):
        write_guest_file(etc, "hostname", b"x", **ME)


def test_read_refuses_symlink_and_fifo(guest: Path, host: Path) -> None:
    os.symlink(os.fspath(host / "passwd"), guest / "etc/passwd")
    os.mkfifo(guest / "etc/fifo")
    with guest_dir(guest, "etc") as etc:
        with pytest.raises(UnsafeImage):
            read_guest_file(etc, "passwd")
        with pytest.raises(UnsafeImage):
            read_guest_file(etc, "fifo")  # would block forever if it were opened for reading normally
        assert read_guest_file(etc, "missing") is None


def test_missing_directory_without_create(guest: Path) -> None:
    with pytest.raises(SeedError, match="does not exist"):
        with guest_dir(guest, "var/lib/cloud"):
            pass


def test_split_refuses_dotdot() -> None:
    assert split_guest_path("/var//lib/./cloud/") == ["var", "lib", "cloud"]
    with pytest.raises(ValueError):
        split_guest_path("var/../../etc")


def test_read_refuses_a_socket_without_crashing(guest: Path) -> None:
    # open(2) of a socket fails with ENXIO, of a device node on the nodev guest mount with EACCES:
    # either is the image's doing and must be an UnsafeImage, not an OSError traceback.
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(guest / "etc/passwd"))
        with guest_dir(guest, "etc") as etc, pytest.raises(UnsafeImage, match="passwd is not a regular file"):
            read_guest_file(etc, "passwd")


def test_read_error_is_a_seed_error(guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (guest / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")

    def broken(fd: int, n: int) -> bytes:
        raise OSError(5, "Input/output error")

    with guest_dir(guest, "etc") as etc:
        monkeypatch.setattr(os, "read", broken)
        with pytest.raises(SeedError, match="the guest's /etc/passwd cannot be read: Input/output error"):
            read_guest_file(etc, "passwd", shown="/etc/passwd")


def test_write_error_is_a_seed_error(guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    with guest_dir(guest, "etc") as etc:
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(SeedError, match="cannot write hostname into the guest: No space left on device"):
            write_guest_file(etc, "hostname", b"x", **ME)
    assert sorted(p.name for p in (guest / "etc").iterdir()) == []  # no temporary left behind


def test_directory_that_cannot_be_made_is_a_seed_error(guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(SeedError, match="cannot create /var/lib/cloud in the guest: Read-only file system"):
        with guest_dir(guest, "var/lib/cloud", create=True, **ME):
            pass
