"""Looking into an instance's disk from the host, read-only, the way an administrator would.

The guest's root filesystem is found with the package's own partition code (by GPT type, never by
number) and mounted read-only through a read-only loop device at the partition's offset, so that
reading a disk never changes a byte of it.  Seeds are read back by Debian's real cloud-init with
the project's reader (tests/support/cloudinit_reader.py, run under /usr/bin/python3).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instance_cloudimage.disk.exportstream import HEADER, MAGIC
from instance_cloudimage.disk.importstream import Header, parse_header
from instance_cloudimage.disk.mount import attach_loop, mount_partition
from instance_cloudimage.disk.partitions import GuestLayout, Partition, find_guest_layout
from tests.support.delivery_helpers import run_reader

ARCH = "x86_64"
NOCLOUD_DIR = "var/lib/cloud/seed/nocloud"


@dataclass(frozen=True)
class GuestRoot:
    path: Path  # the read-only mount point
    layout: GuestLayout
    device: str  # the read-only loop device of the root partition


@contextmanager
def guest_root(disk: Path) -> Iterator[GuestRoot]:
    """The guest's root filesystem of ``disk`` mounted read-only; unmounted and detached afterwards."""
    layout = find_guest_layout(os.fspath(disk), ARCH)
    with ExitStack() as stack:
        device, where = mount_partition(os.fspath(disk), layout.root, stack, read_only=True)
        yield GuestRoot(where, layout, device)


def read_seed(disk: Path) -> dict[str, Any]:
    """What cloud-init's NoCloud datasource reads from the seed directory in the guest of ``disk``.

    Also ``seed_files``: the raw seed files, and ``modes``: their mode and owner.
    """
    with tempfile.TemporaryDirectory(prefix="cluster-seed-") as tmp:
        copy = Path(tmp) / "nocloud"
        with guest_root(disk) as root:
            seed = root.path / NOCLOUD_DIR
            modes = {p.name: (p.lstat().st_mode & 0o7777, p.lstat().st_uid) for p in seed.iterdir()}
            shutil.copytree(seed, copy, symlinks=True)
        result = run_reader("nocloud", copy)
        result["seed_files"] = {p.name: p.read_bytes() for p in copy.iterdir()}
    result["modes"] = modes
    return result


def digest_outside_root(disk: Path) -> str:
    """SHA-256 of every byte of ``disk`` outside its root filesystem's partition (partition table,
    other partitions, a backup GPT): what an import's re-seed never touches."""
    root = find_guest_layout(os.fspath(disk), ARCH).root
    h = hashlib.sha256()
    with open(disk, "rb") as f:
        for start, end in ((0, root.start), (root.end, disk.stat().st_size)):
            f.seek(start)
            left = end - start
            while left > 0 and (chunk := f.read(min(left, 4 * 1024 * 1024))):
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


Manifest = dict[str, tuple[object, ...]]


def filesystem_manifest(disk: Path, exclude: str = NOCLOUD_DIR) -> Manifest:
    """Every entry of the guest's root filesystem but ``exclude`` (the seed directory): type, mode,
    owner, size, mtime and content (SHA-256, or a link's target), read through a read-only mount."""
    out: Manifest = {}
    with guest_root(disk) as root:
        for top, dirs, files in os.walk(root.path):
            rel_top = os.path.relpath(top, root.path)
            dirs[:] = sorted(d for d in dirs if os.path.normpath(os.path.join(rel_top, d)) != exclude)
            for name in [*dirs, *sorted(files)]:
                path = os.path.join(top, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    content: object = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    content = os.readlink(path)
                else:
                    content = None
                out[os.path.normpath(os.path.join(rel_top, name))] = (
                    st.st_mode, st.st_uid, st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                    st.st_mtime_ns, content)
    return out


def read_guest_file(disk: Path, rel: str) -> bytes | None:
    """A file of the guest's root filesystem (None when it does not exist)."""
    with guest_root(disk) as root:
        path = root.path / rel
        return path.read_bytes() if path.is_file() else None


@dataclass(frozen=True)
class RootFilesystem:
    partition: Partition
    block_count: int
    block_size: int
    fsck_clean: bool
    fsck_output: str

    @property
    def size(self) -> int:
        return self.block_count * self.block_size


def inspect_root_filesystem(disk: Path) -> RootFilesystem:
    """The root partition and its ext4 filesystem's size, and whether ``e2fsck -fn`` finds it clean."""
    layout = find_guest_layout(os.fspath(disk), ARCH)
    part = layout.root
    assert part.fstype == "ext4", part
    with ExitStack() as stack:
        device = attach_loop(os.fspath(disk), stack, offset=part.start, size=part.size, read_only=True)
        header = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True, check=True).stdout
        fsck = subprocess.run(["e2fsck", "-f", "-n", device], capture_output=True, text=True, check=False)
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    return RootFilesystem(part, int(fields["Block count"]), int(fields["Block size"]), fsck.returncode == 0,
                          fsck.stdout + fsck.stderr)


def read_dump_header(dump: Path) -> Header:
    """The header of an export dump, which must be our compact stream (AssertionError otherwise)."""
    with open(dump, "rb") as f:
        head = f.read(HEADER.size)
    if head[:len(MAGIC)] != MAGIC:
        raise AssertionError(f"{dump} does not start with the compact stream's magic: {head[:len(MAGIC)]!r}")
    return parse_header(head)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()
