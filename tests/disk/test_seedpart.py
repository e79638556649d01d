"""disk/seedpart.py on real tables made with sfdisk: where the seed partition goes, and crafted tables
(overlapping entries, entries past the usable area, a full GPT, a full MBR) refused in one line with
the table left byte for byte as it was.  Files only: no root, no loop device."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from instance_cloudimage.disk.seedpart import (
    GPT_NAME,
    MIB,
    SEED_PARTITION_SIZE,
    add_seed_partition,
    copy_partition_out,
    find_seed_partition,
    write_into_partition,
)
from instance_cloudimage.runtime.errors import SeedError, UnsafeImage
from tests.conftest import need_tools

LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


@pytest.fixture(autouse=True)
def tools() -> None:
    need_tools("sfdisk", "sgdisk", "blkid", "mkfs.vfat", "growpart")


def sh(*argv: str, input: str | None = None) -> str:
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=True).stdout


def make_disk(path: Path, table: str, image_mib: int, disk_mib: int) -> Path:
    """An image of ``image_mib`` with sfdisk's ``table`` script, then grown to a ``disk_mib`` disk
    (as an image written onto a larger Ganeti disk)."""
    with open(path, "wb") as f:
        f.truncate(image_mib * MIB)
    sh("sfdisk", "--quiet", os.fspath(path), input=table)
    with open(path, "r+b") as f:
        f.truncate(disk_mib * MIB)
    return path


def dump(path: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(sh("sfdisk", "--json", os.fspath(path)))["partitiontable"]
    return out


def edit_gpt_entry(path: Path, index: int, *, first: int | None = None, last: int | None = None) -> None:
    """Rewrite entry ``index`` of both GPT copies with valid CRCs: a crafted table that sfdisk still reads."""
    with open(path, "r+b") as f:
        f.seek(512)
        backup = struct.unpack_from("<Q", f.read(92), 32)[0]
        for lba in (1, backup):
            f.seek(lba * 512)
            header = bytearray(f.read(92))
            entries_lba, count, size = struct.unpack_from("<QII", header, 72)
            f.seek(entries_lba * 512)
            entries = bytearray(f.read(count * size))
            if first is not None:
                struct.pack_into("<Q", entries, index * size + 32, first)
            if last is not None:
                struct.pack_into("<Q", entries, index * size + 40, last)
            f.seek(entries_lba * 512)
            f.write(entries)
            struct.pack_into("<I", header, 88, zlib.crc32(entries))
            struct.pack_into("<I", header, 16, 0)
            struct.pack_into("<I", header, 16, zlib.crc32(bytes(header)))
            f.seek(lba * 512)
            f.write(header)


def test_gpt_gets_the_seed_at_the_disk_end_after_relocating_the_backup(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", f"label: gpt\nsize=40MiB, type={LINUX}\n", 64, 256)
    part = add_seed_partition(os.fspath(disk))
    table = dump(disk)
    assert table["lastlba"] == 256 * 2048 - 34  # the backup header is at the disk's end
    seed = table["partitions"][1]  # type: ignore[index]
    assert seed["name"] == GPT_NAME and part.number == 2
    assert part.size == SEED_PARTITION_SIZE and part.start % MIB == 0
    assert part.end <= (256 * 2048 - 33) * 512
    assert "No problems found" in sh("sgdisk", "-v", os.fspath(disk))


def test_growpart_grows_the_root_up_to_the_seed_partition(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", f"label: gpt\nsize=40MiB, type={LINUX}\n", 64, 256)
    seed = add_seed_partition(os.fspath(disk))
    sh("growpart", os.fspath(disk), "1")  # what cloud-init's cc_growpart runs at first boot
    root, after = dump(disk)["partitions"]  # type: ignore[misc]
    assert (root["start"] + root["size"]) * 512 == seed.start  # grown right up to it
    assert after["start"] * 512 == seed.start and after["size"] * 512 == seed.size  # the seed stays


def test_mbr_takes_a_free_primary_slot(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", "label: dos\nsize=20MiB, type=83\nsize=20MiB, type=83\n", 64, 128)
    part = add_seed_partition(os.fspath(disk))
    assert part.number == 3 and part.end <= 128 * MIB and part.start % MIB == 0
    assert dump(disk)["partitions"][2]["type"] == "e"  # type: ignore[index]


def test_mbr_with_an_extended_partition_gets_a_primary_after_it(tmp_path: Path) -> None:
    table = ("label: dos\nstart=2048, size=8MiB, type=83\nstart=18432, size=40MiB, type=5\n"
             "start=20480, size=20MiB, type=83\n")
    disk = make_disk(tmp_path / "d.img", table, 64, 128)
    part = add_seed_partition(os.fspath(disk))
    assert part.number == 3 and part.start >= 49 * MIB
    assert [p["node"][-1] for p in dump(disk)["partitions"]] == ["1", "2", "3", "5"]  # type: ignore[attr-defined]


def refused(disk: Path, error: type[Exception], text: str) -> str:
    before = disk.read_bytes()
    with pytest.raises(error) as e:
        add_seed_partition(os.fspath(disk))
    assert text in str(e.value)
    assert "\n" not in str(e.value)
    assert disk.read_bytes() == before, "the table was changed"
    return str(e.value)


def test_full_mbr_is_refused_naming_the_alternatives(tmp_path: Path) -> None:
    table = "label: dos\n" + "size=10MiB, type=83\n" * 4
    msg = refused(make_disk(tmp_path / "d.img", table, 64, 128), SeedError, "no free primary slot (all 4 are used)")
    assert "second disk" in msg and "TrustedDirectories" in msg


def test_full_gpt_is_refused(tmp_path: Path) -> None:
    table = "label: gpt\ntable-length: 4\n" + "size=8MiB\n" * 4
    refused(make_disk(tmp_path / "d.img", table, 64, 128), SeedError, "no free entry (all 4 are used)")


def test_gpt_with_overlapping_entries_is_refused(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", "label: gpt\nsize=20MiB\nsize=20MiB\n", 64, 128)
    edit_gpt_entry(disk, 1, first=30000)
    refused(disk, UnsafeImage, "partitions 1 and 2 overlap")


def test_gpt_entry_past_the_usable_area_is_refused(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", "label: gpt\nsize=20MiB\n", 64, 128)
    edit_gpt_entry(disk, 0, last=200000)  # inside the disk, past the image's last usable sector
    refused(disk, UnsafeImage, "partition 1 lies outside the table's usable area")


def test_gpt_entry_past_the_disk_is_refused(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", "label: gpt\nsize=20MiB\n", 64, 64)
    edit_gpt_entry(disk, 0, last=900000)
    refused(disk, UnsafeImage, "partition 1 lies outside the disk")


def test_mbr_primaries_overlapping_are_refused(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", "label: dos\nstart=2048, size=20480, type=83\n", 64, 128)
    with open(disk, "r+b") as f:  # entry 2 at 0x1ce: type 83, starting inside partition 1
        f.seek(0x1CE)
        f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 10000, 20480))
    refused(disk, UnsafeImage, "partitions 1 and 2 overlap")


def test_no_room_at_the_end_is_refused(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", "label: gpt\nsize=+\n", 64, 64)  # the image fills the disk
    refused(disk, SeedError, "no room for the 4.0 MiB seed partition")


def test_bare_filesystem_has_no_table(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
    sh("mkfs.vfat", os.fspath(disk))
    refused(disk, SeedError, "no partition table (a bare filesystem image)")


def test_written_partition_is_found_and_read_back(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "d.img", f"label: gpt\nsize=40MiB, type={LINUX}\n", 64, 128)
    part = add_seed_partition(os.fspath(disk))
    fat = tmp_path / "fat.img"
    sh("mkfs.vfat", "-C", "-n", "CIDATA", os.fspath(fat), str(part.size // 1024))
    write_into_partition(os.fspath(disk), part, os.fspath(fat))
    found = find_seed_partition(os.fspath(disk), ("CIDATA", "cidata"))
    assert found is not None and found.start == part.start
    copy_partition_out(os.fspath(disk), found, os.fspath(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == fat.read_bytes()[:part.size]
    assert find_seed_partition(os.fspath(disk), ("config-2",)) is None
