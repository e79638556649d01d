"""guestfs: mounting the guest's root (and /var) through loop devices, undone on every path out."""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest

from instance_cloudimage.disk.mount import mount_guest_root
from instance_cloudimage.runtime.errors import SeedError, UnsafeImage
from tests.support import guest_images as gi

pytestmark = pytest.mark.integration


def mount_line(path: Path) -> str:
    with open("/proc/mounts") as f:
        return next(ln for ln in f if ln.split()[1] == os.fspath(path))


def assert_clean(*images: Path) -> None:
    for img in images:
        assert gi.no_loops(img), f"loop device left on {img}"
    assert gi.our_mounts(*images) == []


@pytest.mark.parametrize(("builder", "number", "fstype"), [
    (gi.gpt_root_first, 1, "ext4"),
    (gi.rocky_like, 3, "xfs"),
    (gi.mbr_logical_root, 5, "ext4"),
    (lambda p: gi.gpt_root_first(p, "btrfs"), 1, "btrfs"),
])
def test_mounts_the_root_read_write_and_unmounts(tmp_path: Path, builder, number: int, fstype: str) -> None:  # type: ignore[no-untyped-def]
    img = builder(tmp_path / "disk.img")
    with ExitStack() as stack:
        m = mount_guest_root(str(img), stack, arch="x86_64")
        assert m.partition_number == number and m.root.fstype == fstype
        assert (m.path / "etc/hostname").read_text() == "localhost\n"
        opts = mount_line(m.path).split()[3].split(",")
        assert {"rw", "nosuid", "nodev", "noexec"} <= set(opts)
        if fstype == "xfs":
            assert "nouuid" in opts
        (m.path / "written").write_text("x")
        assert gi.loops_of(img) != ""
    assert_clean(img)
    assert not m.path.exists()


def test_two_clones_of_one_xfs_image_mount_together(tmp_path: Path) -> None:
    a = gi.rocky_like(tmp_path / "a.img")
    b = tmp_path / "b.img"
    shutil.copyfile(a, b)
    with ExitStack() as stack:
        ma = mount_guest_root(str(a), stack, arch="x86_64")
        mb = mount_guest_root(str(b), stack, arch="x86_64")
        assert ma.path != mb.path and (mb.path / "etc/hostname").exists()
    assert_clean(a, b)


def test_separate_var_is_mounted_inside_the_root(tmp_path: Path) -> None:
    img = gi.separate_var(tmp_path / "var.img")
    with ExitStack() as stack:
        m = mount_guest_root(str(img), stack, arch="x86_64")
        assert m.var is not None and m.var.number == 2
        assert (m.path / "var/lib/cloud/.keep").exists()
        assert (m.path / "var/log/.keep").exists()
        assert mount_line(m.path / "var")
    assert_clean(img)


def test_read_only_mount_changes_no_byte_of_the_disk(tmp_path: Path) -> None:
    img = gi.separate_var(tmp_path / "var.img")
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    with ExitStack() as stack:
        m = mount_guest_root(str(img), stack, arch="x86_64", read_only=True)
        assert (m.path / "var/lib/cloud/.keep").exists()
        for where in (m.path, m.path / "var"):
            assert "ro" in mount_line(where).split()[3].split(",")
        with pytest.raises(OSError):
            (m.path / "written").write_text("x")
    assert_clean(img)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


def test_var_symlink_to_host_is_refused_and_cleaned_up(tmp_path: Path) -> None:
    host = tmp_path / "host-var"
    host.mkdir()
    img = gi.build_disk(tmp_path / "hostile.img", 128, "gpt",
                        [gi.Part(48, gi.ROOT_X86_64), gi.Part(None, gi.VAR)],
                        [gi.Fs(1, "ext4", files={"etc/hostname": "x\n"}, symlinks={"var": os.fspath(host)}),
                         gi.Fs(2, "ext4", files={"lib/cloud/.keep": ""})])
    with pytest.raises(UnsafeImage, match="/var is a symbolic link"), ExitStack() as stack:
        mount_guest_root(str(img), stack, arch="x86_64")
    assert list(host.iterdir()) == []
    assert_clean(img)


def test_error_inside_the_block_still_unmounts(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk.img")
    with pytest.raises(RuntimeError), ExitStack() as stack:
        mount_guest_root(str(img), stack, arch="x86_64")
        raise RuntimeError("a later step failed")
    assert_clean(img)


def test_no_linux_filesystem_attaches_nothing(tmp_path: Path) -> None:
    img = gi.no_linux_fs(tmp_path / "efi-only.img")
    with pytest.raises(SeedError, match="no ext4, xfs or btrfs"), ExitStack() as stack:
        mount_guest_root(str(img), stack, arch="x86_64")
    assert_clean(img)
