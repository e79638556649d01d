"""The seed in a partition of disk 0 (``nocloud-partition``, ``configdrive-partition``), written and
rewritten without a mount.

Create adds the partition (disk/seedpart.py) and fills it with a FAT built in a private file by
mkfs.vfat and mtools; import and rename copy the partition's bytes out into a private file, change
the files in it with mtools and write it back only when something changed.  The host kernel never
parses a filesystem of the image: this is how an untrusted image is seeded (sources/trust.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from instance_cloudimage.disk.partitions import Partition
from instance_cloudimage.disk.seedpart import (
    SEED_PARTITION_SIZE,
    add_seed_partition,
    copy_partition_out,
    find_seed_partition,
    write_into_partition,
)
from instance_cloudimage.seed.drive import SEED_LABELS, make_fat_file, needed_size

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@contextmanager
def private_image() -> Iterator[str]:
    """A path for a FAT image in a new 0700 directory: seed files hold password hashes and user-data."""
    with tempfile.TemporaryDirectory(prefix="cloudimage-seedpart-") as tmp:
        os.chmod(tmp, 0o700)
        yield os.path.join(tmp, "seed.img")


def write_seed_partition(disk_path: str, label: str, files: Mapping[str, bytes]) -> Partition:
    """Add a seed partition at the end of disk 0 and put a FAT labelled ``label`` holding ``files`` in it.
    Raises SeedError or UnsafeImage (a table that does not check out) before anything is written."""
    size = max(SEED_PARTITION_SIZE, -(-needed_size(files) // MIB) * MIB)
    part = add_seed_partition(disk_path, size)
    with private_image() as image:
        make_fat_file(image, label, files, part.size // 1024 * 1024)
        write_into_partition(disk_path, part, image)
    log.info("wrote a %s seed (%d files) into partition %s of disk 0", label, len(files), part.number)
    return part


def find_partition_seed(disk_path: str) -> Partition | None:
    """Disk 0's seed partition (a FAT labelled cidata or config-2), read from the table and superblocks only."""
    return find_seed_partition(disk_path, SEED_LABELS)


@contextmanager
def partition_copy(disk_path: str, part: Partition) -> Iterator[str]:
    """A private copy of the partition's filesystem, to read with mtools; never written back."""
    with private_image() as image:
        copy_partition_out(disk_path, part, image)
        yield image


def edit_partition(disk_path: str, part: Partition, edit: Callable[[str], bool]) -> bool:
    """Run ``edit`` on a private copy of the partition's filesystem; write it back when ``edit`` says
    it changed something.  Returns what ``edit`` returned."""
    with partition_copy(disk_path, part) as image:
        changed = edit(image)
        if changed:
            write_into_partition(disk_path, part, image)
    return changed
