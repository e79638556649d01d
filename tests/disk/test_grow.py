"""grow: the root partition and filesystem fill the disk, and fsck stays clean."""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from pathlib import Path

import pytest

from instance_cloudimage.disk.grow import grow_root, growth_limit
from instance_cloudimage.disk.partitions import LINUX_DATA, Partition, PartitionTable
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.params.table import grow_requested
from instance_cloudimage.runtime.errors import GrowError, ParameterError
from instance_cloudimage.runtime.settings import ParsedIni
from tests.support import guest_images as gi

M = 1024 * 1024


def variant(grow: bool) -> Variant:
    return Variant("v", Path("/v.conf"), "", "flamingo", "auto", 2, grow, ("x86_64",), ParsedIni({}, {}, {}))


def test_grow_requested_from_parameter_or_variant() -> None:
    assert grow_requested({}, variant(True)) is True
    assert grow_requested({}, variant(False)) is False
    assert grow_requested({"grow_root": "no"}, variant(True)) is False
    assert grow_requested({"grow_root": "yes"}, variant(False)) is True
    with pytest.raises(ParameterError, match="grow_root must be yes or no"):
        grow_requested({"grow_root": "maybe"}, variant(False))


def gpt(*parts: Partition, disk_mib: int = 1024) -> PartitionTable:
    return PartitionTable("gpt", 512, disk_mib * M, parts, last_lba=disk_mib * 2048 - 34)


def test_last_partition_grows_to_the_backup_gpt() -> None:
    root = Partition(2, 100 * M, 400 * M, LINUX_DATA, "ext4")
    limit, container = growth_limit(gpt(Partition(1, M, 99 * M, LINUX_DATA), root), root)
    assert (limit, container) == (1024 * M - 33 * 512, None)


def test_partition_followed_by_free_space_grows_up_to_the_next() -> None:
    root = Partition(1, M, 100 * M, LINUX_DATA, "ext4")
    limit, _ = growth_limit(gpt(root, Partition(2, 500 * M, 100 * M, LINUX_DATA)), root)
    assert limit == 500 * M


def test_partition_followed_directly_cannot_grow() -> None:
    root = Partition(1, M, 100 * M, LINUX_DATA, "ext4")
    with pytest.raises(GrowError, match="partition 2 follows it directly; only the last partition"):
        growth_limit(gpt(root, Partition(2, 101 * M, 100 * M, "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F")), root)


def test_logical_partition_grows_with_its_container() -> None:
    ext = Partition(2, 100 * M, 200 * M, "5")
    root = Partition(5, 101 * M, 199 * M, "83", "ext4")
    t = PartitionTable("dos", 512, 1024 * M, (Partition(1, M, 99 * M, "83"), ext, root))
    limit, container = growth_limit(t, root)
    assert (limit, container) == (1024 * M, ext)


# --- real images (integration) -------------------------------------------------------------------

def fs_size(dev: str, fstype: str) -> int:
    if fstype == "ext4":
        out = gi.sh("dumpe2fs", "-h", dev)
        count = int(re.search(r"Block count:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        return count * int(re.search(r"Block size:\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    if fstype == "xfs":
        out = gi.sh("xfs_db", "-r", "-c", "sb 0", "-c", "p dblocks blocksize", dev)
        v = dict(re.findall(r"(\w+) = (\d+)", out))
        return int(v["dblocks"]) * int(v["blocksize"])
    out = gi.sh("btrfs", "inspect-internal", "dump-super", dev)
    return int(re.search(r"^total_bytes\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]


def fsck(dev: str, fstype: str) -> None:
    if fstype == "ext4":
        gi.sh("e2fsck", "-fn", dev)
    elif fstype == "xfs":
        gi.sh("xfs_repair", "-n", dev)
    else:
        gi.sh("btrfs", "check", "--readonly", dev)


def grow_and_check(img: Path, number: int, fstype: str, disk_mib: int) -> None:
    with open(img, "r+b") as f:  # the instance's disk is larger than the image written onto it
        f.truncate(disk_mib * M)
    with ExitStack() as stack:
        result = grow_root(os.fspath(img), "x86_64", stack)
    assert result.partition.number == number and result.new_size > result.old_size
    start, size = gi.partition_offsets(img)[number]
    assert disk_mib * M - (start + size) < M  # the partition reaches the end (minus the backup GPT)
    with gi.loop(img, start, size) as dev:
        assert size - fs_size(dev, fstype) < 4 * M  # the filesystem fills the partition
        fsck(dev, fstype)
    assert gi.no_loops(img) and gi.our_mounts(img) == []


@pytest.mark.integration
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_grow_gpt(tmp_path: Path, fstype: str) -> None:
    img = gi.gpt_root_first(tmp_path / "gpt.img", fstype, size_mib=160)
    grow_and_check(img, 1, fstype, 400)
    data = json.loads(gi.sh("sfdisk", "--json", os.fspath(img)))["partitiontable"]
    assert data["lastlba"] == 400 * 2048 - 34  # the backup GPT moved to the disk's end
    assert "No problems found" in gi.sh("sgdisk", "--verify", os.fspath(img))


@pytest.mark.integration
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_grow_mbr(tmp_path: Path, fstype: str) -> None:
    img = gi.mbr_primary_root(tmp_path / "mbr.img", fstype, size_mib=160)
    grow_and_check(img, 1, fstype, 400)


@pytest.mark.integration
def test_grow_mbr_logical_root_grows_its_container(tmp_path: Path) -> None:
    img = gi.mbr_logical_root(tmp_path / "mbr.img")
    grow_and_check(img, 5, "ext4", 256)
    assert gi.partition_offsets(img)[2][0] + gi.partition_offsets(img)[2][1] == 256 * M


@pytest.mark.integration
def test_grow_rocky_like_root_3(tmp_path: Path) -> None:
    img = gi.rocky_like(tmp_path / "rocky.img")
    grow_and_check(img, 3, "xfs", 400)


@pytest.mark.integration
def test_root_followed_by_another_partition_is_refused(tmp_path: Path) -> None:
    img = gi.separate_var(tmp_path / "var.img")  # root is 1, /var directly behind it
    with open(img, "r+b") as f:
        f.truncate(256 * M)
    before = gi.sh("sfdisk", "--dump", os.fspath(img))
    with pytest.raises(GrowError, match="partition 2 follows it directly"), ExitStack() as stack:
        grow_root(os.fspath(img), "x86_64", stack)
    after = gi.sh("sfdisk", "--dump", os.fspath(img))
    assert [ln for ln in before.splitlines() if "start=" in ln] == [ln for ln in after.splitlines() if "start=" in ln]
    assert gi.no_loops(img)


@pytest.mark.integration
def test_unpartitioned_filesystem_grows_to_the_disk(tmp_path: Path) -> None:
    img = gi.build_disk(tmp_path / "fs.img", 48, "none", [], [gi.Fs(None, "ext4", "root")])
    with open(img, "r+b") as f:
        f.truncate(128 * M)
    with ExitStack() as stack:
        grow_root(os.fspath(img), "x86_64", stack)
    assert fs_size(os.fspath(img), "ext4") == 128 * M
    gi.sh("e2fsck", "-fn", os.fspath(img))


@pytest.mark.integration
def test_no_linux_filesystem_cannot_grow(tmp_path: Path) -> None:
    img = gi.no_linux_fs(tmp_path / "efi.img")
    with pytest.raises(GrowError, match="cannot grow the root filesystem: no ext4"), ExitStack() as stack:
        grow_root(os.fspath(img), "x86_64", stack)
