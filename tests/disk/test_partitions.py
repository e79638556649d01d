"""partitions: the table is read with sfdisk, the guest's root chosen by type, label and size."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from instance_cloudimage.disk.partitions import (
    ESP,
    LINUX_DATA,
    ROOT_TYPES,
    VAR,
    XBOOTLDR,
    Partition,
    PartitionTable,
    _parse_sfdisk,
    choose_guest_layout,
    read_partition_table,
)
from instance_cloudimage.runtime.errors import SeedError
from tests.support import guest_images as gi

M = 1024 * 1024


def table(label: str, *parts: Partition) -> PartitionTable:
    return PartitionTable(label, 512, 1024 * M, parts)


def part(n: int, type_: str, fs: str | None, size_mib: int, label: str | None = None, start_mib: int = 0) -> Partition:
    return Partition(n, (start_mib or n * 100) * M, size_mib * M, type_, fs, label)


# --- choice (unit) -------------------------------------------------------------------------------

def test_arch_root_type_wins_over_size_and_number() -> None:
    t = table("gpt", part(1, LINUX_DATA, "ext4", 500), part(2, ROOT_TYPES["x86_64"], "ext4", 100))
    assert choose_guest_layout(t, "x86_64").root.number == 2


def test_rocky_like_root_behind_efi_and_boot() -> None:
    t = table("gpt", part(1, ESP, "vfat", 100), part(2, XBOOTLDR, "xfs", 1000, "boot"),
              part(3, LINUX_DATA, "xfs", 900, "rocky"))
    assert choose_guest_layout(t, "x86_64").root.number == 3


def test_boot_label_loses_to_larger_plain_linux_partition() -> None:
    t = table("dos", part(1, "83", "ext4", 512, "boot"), part(2, "83", "ext4", 100))
    assert choose_guest_layout(t, "x86_64").root.number == 2


def test_root_label_beats_size_among_linux_partitions() -> None:
    t = table("dos", part(1, "83", "ext4", 900, "data"), part(5, "83", "ext4", 100, "cloudimg-rootfs"))
    assert choose_guest_layout(t, "x86_64").root.number == 5


def test_largest_linux_filesystem_as_last_resort() -> None:
    t = table("gpt", part(1, "933AC7E1-2EB4-4F13-B844-0E14E2AEF915", "ext4", 900),  # /home
              part(2, "11111111-2222-3333-4444-555555555555", "btrfs", 300),
              part(3, "11111111-2222-3333-4444-555555555555", "xfs", 200))
    assert choose_guest_layout(t, "x86_64").root.number == 2


def test_separate_var_is_found_by_type() -> None:
    t = table("gpt", part(1, ROOT_TYPES["x86_64"], "ext4", 100), part(2, VAR, "xfs", 800))
    layout = choose_guest_layout(t, "x86_64")
    assert (layout.root.number, layout.var and layout.var.number) == (1, 2)


def test_other_architecture_root_is_used_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    t = table("gpt", part(1, ROOT_TYPES["aarch64"], "ext4", 100))
    with caplog.at_level(logging.WARNING):
        assert choose_guest_layout(t, "x86_64").root.number == 1
    assert "another architecture" in caplog.text


def test_no_linux_filesystem_is_a_clear_error() -> None:
    t = table("gpt", part(1, ESP, "vfat", 100), part(2, LINUX_DATA, None, 500))
    with pytest.raises(SeedError, match=r"no ext4, xfs or btrfs filesystem.*partition 1 \(vfat"):
        choose_guest_layout(t, "x86_64")


def test_lvm_is_named() -> None:
    t = table("dos", part(1, "83", "ext4", 100, "boot"), part(2, "8e", "LVM2_member", 900))
    assert choose_guest_layout(t, "x86_64").root.number == 1  # only /boot is visible: still a root candidate
    t2 = table("dos", part(2, "8e", "LVM2_member", 900))
    with pytest.raises(SeedError, match="LVM"):
        choose_guest_layout(t2, "x86_64")


def test_only_efi_and_swap_typed_linux_filesystems_are_no_root() -> None:
    t = table("gpt", part(1, XBOOTLDR, "ext4", 100))
    with pytest.raises(SeedError, match="no root filesystem"):
        choose_guest_layout(t, "x86_64")


# --- real tables (integration) ---------------------------------------------------------------------



@pytest.mark.integration
def test_reads_gpt_with_filesystems(tmp_path: Path) -> None:
    img = gi.rocky_like(tmp_path / "rocky.img")
    t = read_partition_table(str(img))
    assert t.label == "gpt"
    assert [(p.number, p.fstype) for p in t.partitions] == [(1, "vfat"), (2, "xfs"), (3, "xfs")]
    assert t.partitions[2].label == "rocky"
    assert t.last_lba is not None and t.partitions[2].end <= (t.last_lba + 1) * 512
    assert choose_guest_layout(t, "x86_64").root.number == 3


@pytest.mark.integration
def test_reads_mbr_logical_partitions(tmp_path: Path) -> None:
    img = gi.mbr_logical_root(tmp_path / "mbr.img")
    t = read_partition_table(str(img))
    assert t.label == "dos"
    assert [(p.number, p.type, p.fstype) for p in t.partitions] == [(1, "83", "ext4"), (2, "5", None),
                                                                      (5, "83", "ext4")]
    assert choose_guest_layout(t, "x86_64").root.number == 5


@pytest.mark.integration
def test_unpartitioned_filesystem_image(tmp_path: Path) -> None:
    img = gi.build_disk(tmp_path / "fs.img", 32, "none", [], [gi.Fs(None, "ext4", "root")])
    t = read_partition_table(str(img))
    assert t.label == "none"
    assert len(t.partitions) == 1 and t.partitions[0].number is None and t.partitions[0].size == 32 * M
    assert choose_guest_layout(t, "x86_64").root.fstype == "ext4"


@pytest.mark.integration
def test_empty_disk_has_no_partitions(tmp_path: Path) -> None:
    t = read_partition_table(str(gi.blank(tmp_path / "blank.img", 8)))
    assert t.partitions == ()
    with pytest.raises(SeedError, match="found: nothing"):
        choose_guest_layout(t, "x86_64")


@pytest.mark.integration
def test_truncated_gpt_image_is_named(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "gpt.img", size_mib=64)
    with open(img, "r+b") as f:  # a truncated download: the backup GPT is gone
        f.truncate(32 * M)
    t = read_partition_table(str(img))
    with pytest.raises(SeedError, match="GPT is damaged or the image is truncated"):
        choose_guest_layout(t, "x86_64")


def test_partition_beyond_the_disk_is_refused() -> None:
    data = {"partitiontable": {"label": "gpt", "sectorsize": 512, "partitions": [
        {"node": "/dev/x1", "start": 2048, "size": 10**9, "type": LINUX_DATA}]}}
    with pytest.raises(SeedError, match="partition 1 lies outside the disk"):
        _parse_sfdisk(data, 64 * M)
