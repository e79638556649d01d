"""The seed partition: a small partition at the end of disk 0 for an image the node must not mount.

The partition table is read with ``sfdisk --json``, checked (entries inside the usable area, no
two overlapping, a free entry, room at the end) and only then written: on GPT the backup header
first moves to the disk's end (``sfdisk --relocate gpt-bak-std``, which also fixes the protective
MBR), the table is checked again, ``sgdisk -v`` must find no problem, and one new entry covers the
last few MiB (``sfdisk -N``); on MBR a free primary slot below 2 TiB.  The filesystem's bytes are
built elsewhere (seed/drive.py, in userspace) and copied into the partition here with ``pwrite``:
nothing in this module mounts or attaches anything.

Security: the table comes from an untrusted image.  A crafted one (overlapping entries, entries
past the usable area, a full table) is refused with one line before a byte is written, so the
table stays as the image had it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from instance_cloudimage.disk.partitions import (
    GPT_ENTRIES,
    MBR_EXTENDED,
    Partition,
    PartitionTable,
    read_partition_table,
)
from instance_cloudimage.disk.sparse import write_all
from instance_cloudimage.runtime.errors import CommandError, SeedError, UnsafeImage
from instance_cloudimage.runtime.log import format_size
from instance_cloudimage.runtime.process import run

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SEED_PARTITION_SIZE = 4 * MIB  # a seed is well under 1 MiB; room for a rename's or import's rewrite
MAX_SEED_PARTITION = 64 * MIB  # larger "seed partitions" are not ours: never copied out whole
GPT_BASIC_DATA = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"  # what a FAT partition is typed on GPT
GPT_NAME = "cloudimage-seed"
MBR_FAT16_LBA = "e"
MBR_PRIMARY = range(1, 5)
MBR_MAX_SECTORS = 2**32
SFDISK_SCRIPTED = ["--no-reread", "--no-tell-kernel", "--quiet", "--wipe", "never", "--wipe-partitions", "never"]
ALTERNATIVES = ("give the instance a second disk for the seed (--disk 1:size=64M, seed=nocloud-disk), or have "
                "the site trust the image ([Images] TrustedDirectories) so that it is seeded inside its filesystem")


@dataclass(frozen=True)
class Placement:
    number: int
    start: int  # sectors
    size: int  # sectors


def _damaged(what: str) -> UnsafeImage:
    return UnsafeImage(f"the image's partition table is damaged: {what}; refusing to add the seed partition to it",
                       ALTERNATIVES)


def _is_container(table: PartitionTable, p: Partition) -> bool:
    return table.label == "dos" and p.type in MBR_EXTENDED


def check_overlaps(parts: Iterable[Partition]) -> None:
    ordered = sorted(parts, key=lambda p: (p.start, p.end))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise _damaged(f"partitions {a.number} and {b.number} overlap")


def check_table(table: PartitionTable) -> None:
    """Refuse a table the seed partition cannot safely join; UnsafeImage/SeedError in one line."""
    sector = table.sector_size
    if table.label not in ("gpt", "dos"):
        raise SeedError("disk 0 has no partition table (a bare filesystem image), so it has no room for a "
                        "seed partition", ALTERNATIVES)
    if table.label == "gpt":
        first, last = table.first_lba or 0, table.last_lba or 0
        if not 0 < first <= last or (last + 1) * sector > table.disk_size:
            raise _damaged("its usable area lies outside the disk")
        for p in table.partitions:
            if p.start < first * sector or p.end > (last + 1) * sector:
                raise _damaged(f"partition {p.number} lies outside the table's usable area")
        check_overlaps(table.partitions)
        return
    primaries = [p for p in table.partitions if (p.number or 0) in MBR_PRIMARY]
    check_overlaps(primaries)
    containers = [p for p in primaries if _is_container(table, p)]
    logical = [p for p in table.partitions if (p.number or 0) > 4]
    for p in logical:
        if not any(c.start <= p.start and p.end <= c.end for c in containers):
            raise _damaged(f"logical partition {p.number} lies outside its extended partition")
    check_overlaps(logical)


def gpt_end(table: PartitionTable) -> int:
    """The first sector after the usable area once the backup GPT is at the disk's end: the backup
    header takes the last sector, its entries the ones before it."""
    entry_sectors = -(-(table.table_length or GPT_ENTRIES) * 128 // table.sector_size)
    return table.disk_size // table.sector_size - 1 - entry_sectors


def place_seed(table: PartitionTable, size: int, *, relocated: bool = False) -> Placement:
    """Where the seed partition goes: its entry number and the sectors at the end of the usable area
    (on GPT as it is once the backup header is at the disk's end, which ``relocated`` says it is)."""
    sector = table.sector_size
    align = MIB // sector
    if table.label == "gpt":
        used = {p.number for p in table.partitions}
        free = [n for n in range(1, (table.table_length or GPT_ENTRIES) + 1) if n not in used]
        if not free:
            raise SeedError(f"the image's GPT has no free entry (all {table.table_length} are used), so there "
                            "is no room for a seed partition", ALTERNATIVES)
        end = min(gpt_end(table), (table.last_lba or 0) + 1) if relocated else gpt_end(table)
    else:
        used = {p.number for p in table.partitions if (p.number or 0) in MBR_PRIMARY}
        free = [n for n in MBR_PRIMARY if n not in used]
        if not free:
            raise SeedError("the image's MBR has no free primary slot (all 4 are used), so there is no room for "
                            "a seed partition", ALTERNATIVES)
        end = min(table.disk_size // sector, MBR_MAX_SECTORS)
    start = (end - size // sector) // align * align
    taken = max((p.end // sector for p in table.partitions), default=0)
    if start < taken or start <= 0:
        raise SeedError(f"disk 0 has no room for the {format_size(size)} seed partition after the image's last "
                        "partition", "give disk 0 a few MiB more than the image, or a second disk for the seed")
    return Placement(free[0], start, (end - start) // align * align)


def gpt_problems(disk_path: str) -> str | None:
    """``sgdisk -v``'s verdict: None when it finds no problem, else its first line about one."""
    proc = run(["sgdisk", "-v", disk_path], check=False)
    text = proc.stdout.decode(errors="replace")
    if proc.returncode == 0 and "No problems found" in text:
        return None
    # Its report: paragraphs starting "Problem:" (warnings and cautions are no problems), then a
    # count; a table it cannot read at all only exits non-zero.
    lines = [ln.strip() for ln in text.splitlines()]
    found = [ln for ln in lines if ln.startswith("Problem:")] or [ln for ln in lines if "problem" in ln.lower()]
    return found[0] if found else f"sgdisk -v exited with {proc.returncode}"


def add_seed_partition(disk_path: str, size: int = SEED_PARTITION_SIZE) -> Partition:
    """Add the seed partition at the end of disk 0's table; return it.  Raises UnsafeImage or SeedError
    before anything is written when the table is damaged or has no room."""
    table = read_table(disk_path)
    check_table(table)
    place_seed(table, size)  # refuse before the relocation writes anything
    try:
        if table.label == "gpt":
            run(["sfdisk", *SFDISK_SCRIPTED, "--relocate", "gpt-bak-std", disk_path])
            table = read_table(disk_path)
            check_table(table)
            problem = gpt_problems(disk_path)
            if problem is not None:
                raise _damaged(f"sgdisk -v: {problem}")
        at = place_seed(table, size, relocated=True)
        spec = f"start={at.start}, size={at.size}, type="
        spec += f'{GPT_BASIC_DATA}, name="{GPT_NAME}"' if table.label == "gpt" else MBR_FAT16_LBA
        run(["sfdisk", *SFDISK_SCRIPTED, "-N", str(at.number), disk_path], input=(spec + "\n").encode())
    except CommandError as e:
        raise SeedError(f"cannot add the seed partition to disk 0: {e}") from None
    added = read_table(disk_path)
    part = next((p for p in added.partitions if p.number == at.number), None)
    if part is None or part.start != at.start * added.sector_size or part.size != at.size * added.sector_size:
        raise SeedError("sfdisk did not add the seed partition where it was asked to")
    if added.label == "gpt" and (problem := gpt_problems(disk_path)) is not None:
        raise SeedError(f"the GPT is not consistent after adding the seed partition: {problem}")
    log.info("added the seed partition %d (%s at the end of disk 0)", part.number, format_size(part.size))
    return part


def read_table(disk_path: str) -> PartitionTable:
    """The table alone: placing the seed partition needs no partition's filesystem probed."""
    try:
        return read_partition_table(disk_path, probe=False)
    except SeedError as e:
        raise UnsafeImage(e.message, ALTERNATIVES) from None


def find_seed_partition(disk_path: str, labels: Iterable[str]) -> Partition | None:
    """The last partition holding a FAT or ISO 9660 filesystem with one of ``labels``, or None.
    Only the table and each partition's superblock are read, in userspace (``blkid -p``)."""
    wanted = set(labels)
    table = read_partition_table(disk_path)
    found = [p for p in table.partitions if p.fstype in ("vfat", "iso9660") and p.label in wanted]
    if not found:
        return None
    part = max(found, key=lambda p: p.start)
    if part.size > MAX_SEED_PARTITION:
        raise SeedError(f"partition {part.number} is labelled {part.label} but is {format_size(part.size)}, "
                        "larger than a seed partition; it was left alone")
    return part


def copy_partition_out(disk_path: str, part: Partition, dest: str) -> None:
    """Copy the bytes of ``part`` into the new file ``dest`` (at most MAX_SEED_PARTITION)."""
    if part.size > MAX_SEED_PARTITION:
        raise SeedError(f"partition {part.number} is too large for a seed partition")
    src = os.open(disk_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(src, part.size, part.start)
    finally:
        os.close(src)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data, 0)
    finally:
        os.close(fd)


def write_into_partition(disk_path: str, part: Partition, src: str) -> None:
    """Write the file ``src`` (a filesystem image no larger than ``part``) at the partition's start."""
    with open(src, "rb") as f:
        data = f.read(part.size + 1)
    if len(data) > part.size:
        raise SeedError(f"the seed filesystem is larger than partition {part.number}")
    fd = os.open(disk_path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        write_all(fd, data, part.start)
        os.fsync(fd)
    finally:
        os.close(fd)
