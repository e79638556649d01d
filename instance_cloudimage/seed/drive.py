"""A seed filesystem on a whole instance disk: NoCloud ``cidata`` or OpenStack ``config-2``.

The node's kernel may have no vfat driver, so nothing is mounted: ``wipefs`` clears stale
signatures (an old filesystem or a backup GPT would make the guest's blkid see two things),
``mkfs.vfat`` builds a small FAT at the start of the disk and mtools copies the files in and out.
The guest's filesystem is never touched in this mode.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from instance_cloudimage.disk.convert import target_size
from instance_cloudimage.disk.partitions import probe_filesystem
from instance_cloudimage.ganeti.env import Disk
from instance_cloudimage.runtime.errors import CommandError, SeedError
from instance_cloudimage.runtime.log import format_size
from instance_cloudimage.runtime.process import run

log = logging.getLogger(__name__)

CIDATA = "cidata"
CONFIG_2 = "config-2"
SEED_LABELS = (CIDATA, CONFIG_2, CIDATA.upper(), CONFIG_2.upper())
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
CLUSTER = 4096
# FAT12/16 metadata, root directory and slack; a seed never needs more than this beyond its files.
OVERHEAD = 512 * 1024
# Larger disks get a FAT of this size at their start: enough for any seed, quick to write.
FS_SIZE = 64 * 1024 * 1024
READ_LIMIT = 16 * 1024 * 1024


def check_relative(path: str) -> list[str]:
    """Split a seed file's relative path, refusing anything that could leave the filesystem root."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise SeedError(f"seed file name {path!r} is not a plain relative path")
    return parts


def needed_size(files: Mapping[str, bytes]) -> int:
    """Bytes a FAT needs to hold ``files``: clusters for each file and directory, plus metadata."""
    dirs = {"/".join(check_relative(p)[:-1]) for p in files} - {""}
    clusters = sum(-(-len(data) // CLUSTER) or 1 for data in files.values()) + len(dirs)
    return clusters * CLUSTER + OVERHEAD


def seed_fs_size(files: Mapping[str, bytes], disk_size: int, disk_index: int) -> int:
    """The size of the FAT to make; SeedError naming both sizes when the disk is too small."""
    need = needed_size(files)
    if disk_size < need:
        raise SeedError(f"disk {disk_index} is {format_size(disk_size)} ({disk_size} bytes), too small for "
                        f"the seed, which needs {format_size(need)} ({need} bytes)",
                        "give the instance a seed disk of at least 1 MiB")
    return min(disk_size, max(need, FS_SIZE)) // 1024 * 1024


def describe_disk_content(path: str) -> str | None:
    """None when the disk holds no signature blkid knows, else what it holds ("ext4", "a gpt table")."""
    found = probe_filesystem(path)
    if found.get("PTTYPE"):
        return f"a {found['PTTYPE']} partition table"
    if found.get("TYPE"):
        label = f" labelled {found['LABEL']}" if found.get("LABEL") else ""
        return f"a {found['TYPE']} filesystem{label}"
    return None


def seed_label_of(path: str) -> str | None:
    """The seed label (cidata or config-2) of a vfat/iso9660 filesystem on ``path``, or None."""
    found = probe_filesystem(path)
    if found.get("TYPE") in ("vfat", "iso9660") and found.get("LABEL") in SEED_LABELS:
        return found["LABEL"]
    return None


def require_seed_disk_path(disk: Disk) -> str:
    if disk.path is None:
        raise SeedError(f"disk {disk.index} is only reachable through a URI; the seed needs a "
                        "kernelspace disk")
    if disk.access != "rw":
        raise SeedError(f"disk {disk.index} is read-only; the seed cannot be written onto it")
    return disk.path


def write_seed_disk(disk: Disk, label: str, files: Mapping[str, bytes]) -> None:
    """Make a vfat filesystem labelled ``label`` on ``disk`` holding ``files`` (relative path → bytes)."""
    path = require_seed_disk_path(disk)
    fs_size = seed_fs_size(files, target_size(path), disk.index)
    try:
        run(["wipefs", "--all", "--force", "--quiet", path])
        # --mbr=n: no fake partition table in the boot sector; -I: a whole disk is intended.
        run(["mkfs.vfat", "-I", "--mbr=n", "-n", label, path, str(fs_size // 1024)])
    except CommandError as e:
        raise SeedError(f"cannot make the {label} filesystem on disk {disk.index}: {e}") from None
    copy_into_fat(path, files)
    log.info("wrote a %s seed (%d files) onto disk %d", label, len(files), disk.index)


def make_fat_file(path: str, label: str, files: Mapping[str, bytes], size: int) -> None:
    """Build a FAT filesystem of ``size`` bytes labelled ``label`` in the new file ``path``, holding
    ``files``: mkfs.vfat and mtools only, in userspace (a seed partition's bytes)."""
    if needed_size(files) > size:
        raise SeedError(f"the seed needs {format_size(needed_size(files))}, more than the "
                        f"{format_size(size)} seed partition holds")
    try:
        # -C: make the file; the size is counted in KiB blocks.
        run(["mkfs.vfat", "-C", "-n", label, path, str(size // 1024)])
    except CommandError as e:
        raise SeedError(f"cannot make the {label} filesystem: {e}") from None
    copy_into_fat(path, files)


def copy_into_fat(image: str, files: Mapping[str, bytes]) -> None:
    """Copy ``files`` into the FAT on ``image`` with mtools, replacing existing ones."""
    # Security: seed files hold password hashes and user-data; stage them privately.
    with tempfile.TemporaryDirectory(prefix="cloudimage-seed-") as tmp:
        os.chmod(tmp, 0o700)
        tops: set[str] = set()
        for rel, data in files.items():
            parts = check_relative(rel)
            tops.add(parts[0])
            target = Path(tmp, *parts)
            for depth in range(1, len(parts)):
                Path(tmp, *parts[:depth]).mkdir(mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            run(["mcopy", "-i", image, "-s", "-Q", "-D", "o", *(os.path.join(tmp, t) for t in sorted(tops)), "::/"],
                env=MTOOLS_ENV)
        except CommandError as e:
            raise SeedError(f"cannot copy the seed files onto {image}: {e}") from None


def read_from_fat(image: str, rel: str) -> bytes | None:
    """The content of ``rel`` in the FAT on ``image``, or None when it is not there."""
    check_relative(rel)
    proc = run(["mcopy", "-i", image, "-n", f"::/{rel}", "-"], env=MTOOLS_ENV, check=False)
    if proc.returncode != 0:
        return None
    if len(proc.stdout) > READ_LIMIT:
        raise SeedError(f"{rel} on the seed disk is larger than {READ_LIMIT} bytes")
    return proc.stdout
