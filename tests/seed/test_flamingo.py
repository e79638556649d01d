"""flamingo: host-side hostname and keys in an untrusted guest tree (no root needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import UnsafeImage
from instance_cloudimage.seed.flamingo import apply_flamingo_settings, parse_passwd

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5Zm9ydGVzdGluZ29ubHkxMjM0NTY3ODkw test@example"
ME = f"{os.getuid()}:{os.getgid()}"


def drive(user: str = "me", hostname: str = "vm1.example.org") -> dict[str, bytes]:
    md = {"hostname": hostname, "public_keys": {user: KEY}}
    return {"openstack/latest/meta_data.json": json.dumps(md).encode()}


@pytest.fixture()
def guest(tmp_path: Path) -> Path:
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "home/me").mkdir(parents=True)
    (root / "etc/hostname").write_text("localhost\n")
    return root


def test_passwd_entries_that_cannot_be_a_home_are_skipped() -> None:
    text = ("good:x:1000:1000::/home/good:/bin/sh\n"
            "dotdot:x:1001:1001::/home/../../tmp:/bin/sh\n"
            "relative:x:1002:1002::home/rel:/bin/sh\n"
            "hugeuid:x:99999999999999:0::/home/huge:/bin/sh\n"
            "hugegid:x:0:4294967296::/home/huge:/bin/sh\n")
    assert parse_passwd(text) == {"good": (1000, 1000, "/home/good")}


def test_keys_for_a_user_with_a_dotdot_home_are_skipped(guest: Path, tmp_path: Path) -> None:
    (guest / "etc/passwd").write_text(f"me:x:{ME}::/home/../../outside:/bin/sh\n")
    (tmp_path / "outside").mkdir()
    apply_flamingo_settings(guest, drive(), fstab=False)
    assert (guest / "etc/hostname").read_text() == "vm1.example.org\n"
    assert list((tmp_path / "outside").iterdir()) == []


def test_keys_are_installed_for_a_plain_user(guest: Path) -> None:
    (guest / "etc/passwd").write_text(f"me:x:{ME}::/home/me:/bin/sh\n")
    apply_flamingo_settings(guest, drive(), fstab=False)
    assert (guest / "home/me/.ssh/authorized_keys").read_text() == KEY + "\n"


def test_a_symlinked_mount_point_is_named_in_full(guest: Path, tmp_path: Path) -> None:
    (guest / "etc/passwd").write_text("")
    (guest / "etc/fstab").write_text("")
    (guest / "mnt").mkdir()
    os.symlink(os.fspath(tmp_path), guest / "mnt/config")
    with pytest.raises(UnsafeImage, match="the image's /mnt/config is a symbolic link"):
        apply_flamingo_settings(guest, drive(), fstab=True)
