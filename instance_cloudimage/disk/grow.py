"""Growing the root partition and its filesystem to the end of the disk, on the host.

For agents that never grow (flamingo) and sites that want the full size before first boot.
A cloud image is smaller than the instance's disk: the GPT backup header sits at the image's end
(``sfdisk --relocate gpt-bak-std`` moves it to the disk's end), the root partition is grown with
``sfdisk -N`` (an MBR logical partition after its extended container), then the filesystem:
ext2/3/4 offline with ``e2fsck -f -p`` + ``resize2fs`` on a loop device at the partition's offset,
xfs and btrfs online, mounted ``nosuid,nodev,noexec``.  Only a partition followed by free space
(the last one, typically) can grow; anything else is refused with a message saying so.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass

from instance_cloudimage.disk.mount import attach_loop, make_mount_dir, mount_device
from instance_cloudimage.disk.partitions import (
    MBR_EXTENDED,
    Partition,
    PartitionTable,
    choose_guest_layout,
    read_partition_table,
)
from instance_cloudimage.runtime.errors import CommandError, GrowError, SeedError
from instance_cloudimage.runtime.log import format_size
from instance_cloudimage.runtime.process import run

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MBR_MAX_SECTORS = 2**32
SFDISK_SCRIPTED = ["--no-reread", "--no-tell-kernel", "--quiet", "--wipe", "never", "--wipe-partitions", "never"]


@dataclass(frozen=True)
class GrowResult:
    partition: Partition
    old_size: int
    new_size: int
    fstype: str


def _container(table: PartitionTable, part: Partition) -> Partition | None:
    """The MBR extended partition holding logical partition ``part``."""
    if table.label != "dos" or part.number is None or part.number < 5:
        return None
    return next((p for p in table.partitions if p.type in MBR_EXTENDED and p.start <= part.start < p.end), None)


def usable_end(table: PartitionTable) -> int:
    """The first byte no partition may use: before the backup GPT, or the MBR's 2 TiB limit."""
    if table.label == "gpt":
        return table.disk_size - 33 * table.sector_size  # 32 sectors of entries + the header
    if table.label == "dos":
        return min(table.disk_size, MBR_MAX_SECTORS * table.sector_size)
    return table.disk_size


def growth_limit(table: PartitionTable, root: Partition) -> tuple[int, Partition | None]:
    """(end the root may grow to, extended container that must grow first or None).

    Raises GrowError when another partition starts right where the root ends.
    """
    container = _container(table, root)
    others = [p for p in table.partitions if p is not root and p is not container]
    if container is not None:
        logical_after = [p.start for p in others if p.number and p.number >= 5 and p.start >= root.end]
        if logical_after:
            return _check_room(min(logical_after), root, table), None
        outside = [p.start for p in others if p.start >= container.end]
        limit = min([*outside, usable_end(table)])
        return _check_room(limit, root, table), container if limit > container.end else None
    after = [p.start for p in others if p.start >= root.end]
    return _check_room(min([*after, usable_end(table)]), root, table), None


def _check_room(limit: int, root: Partition, table: PartitionTable) -> int:
    if limit - root.end < MIB and limit < usable_end(table):
        follower = next((p.number for p in table.partitions if p.start == limit), None)
        raise GrowError(f"cannot grow the root, partition {root.number}: partition {follower} follows it "
                        "directly; only the last partition, or one followed by free space, can grow",
                        "set grow_root=no")
    return limit


def _sfdisk_grow(disk_path: str, number: int) -> None:
    run(["sfdisk", *SFDISK_SCRIPTED, "-N", str(number), disk_path], input=b",+\n")


def grow_partition(disk_path: str, table: PartitionTable, root: Partition) -> Partition:
    """Grow ``root`` into the free space after it; return it as the table now records it."""
    if table.label == "gpt" and table.last_lba is not None and \
            (table.last_lba + 1) * table.sector_size < usable_end(table):
        run(["sfdisk", *SFDISK_SCRIPTED, "--relocate", "gpt-bak-std", disk_path])
        table = read_partition_table(disk_path)
        root = table.get(root.number or 0)
    limit, container = growth_limit(table, root)
    if limit - root.end < MIB:
        return root
    assert root.number is not None
    if container is not None and container.number is not None:
        _sfdisk_grow(disk_path, container.number)
    _sfdisk_grow(disk_path, root.number)
    grown = read_partition_table(disk_path).get(root.number)
    if grown.start != root.start or grown.size < root.size:
        raise GrowError(f"sfdisk moved or shrank partition {root.number} instead of growing it")
    return grown


def grow_filesystem(disk_path: str, part: Partition, stack: ExitStack) -> None:
    """Grow the filesystem in ``part`` to fill it."""
    device = attach_loop(disk_path, stack, offset=part.start, size=part.size)
    if part.fstype in ("ext2", "ext3", "ext4"):
        # resize2fs insists on a freshly checked filesystem; -p repairs only what is safe.
        proc = run(["e2fsck", "-f", "-p", device], check=False)
        if proc.returncode >= 4:
            raise GrowError(f"the root {part.fstype} filesystem has errors e2fsck -p cannot fix "
                            f"(exit code {proc.returncode}); it was not grown")
        run(["resize2fs", device])
    elif part.fstype in ("xfs", "btrfs"):
        where = make_mount_dir(stack, prefix="cloudimage-grow-")
        mount_device(device, os.fspath(where), stack)
        if part.fstype == "xfs":
            run(["xfs_growfs", os.fspath(where)])
        else:
            run(["btrfs", "filesystem", "resize", "max", os.fspath(where)])
    else:
        raise GrowError(f"cannot grow a {part.fstype or 'unknown'} root filesystem; only ext2/3/4, xfs "
                        "and btrfs", "set grow_root=no")


def grow_root(disk_path: str, arch: str, stack: ExitStack) -> GrowResult:
    """Grow the guest's root partition and filesystem to the end of ``disk_path``.

    Loop devices and mounts live on a nested stack that is released before returning, on an
    error and on ``cli.Terminated`` alike; ``stack`` is the pipeline's, for symmetry with the
    other steps.  Raises GrowError.
    """
    table = read_partition_table(disk_path)
    try:
        root = choose_guest_layout(table, arch).root
    except SeedError as e:
        raise GrowError(f"cannot grow the root filesystem: {e.message}", "set grow_root=no") from None
    old = root.size
    try:
        grown = root if root.number is None else grow_partition(disk_path, table, root)
        with ExitStack() as inner:
            grow_filesystem(disk_path, grown, inner)
    except CommandError as e:
        raise GrowError(f"growing the root filesystem failed: {e}") from None
    log.info("grew the root %s from %s to %s", grown.describe(), format_size(old), format_size(grown.size))
    return GrowResult(grown, old, grown.size, grown.fstype or "")
