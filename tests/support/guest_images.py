"""Real disk images for the delivery and growth tests: sfdisk tables and real filesystems at offsets.

ext4 is populated with ``mke2fs -d`` at an offset (no loop device); xfs and btrfs are made on a
loop device at the partition's offset, mounted and populated, and detached again.  Everything a
builder attaches it also detaches, so leak checks only see what the code under test left.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
VAR = "4D21B016-B534-45C2-A9FB-5C16E091FD2D"
# mkfs.xfs refuses filesystems under 300 MB unless it believes it runs under fstests.
XFS_SMALL_ENV = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}

BASE_FILES = {
    "etc/hostname": "localhost\n",
    "etc/fstab": "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n",
    "etc/passwd": "root:x:0:0:root:/root:/bin/bash\ncentos:x:1000:1000::/home/centos:/bin/bash\n",
    "root/.keep": "",
    "home/centos/.keep": "",
    "var/lib/cloud/.keep": "",
}


def sh(*argv: str, input: bytes | None = None, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(argv, input=input, capture_output=True, check=False,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed: {proc.stderr.decode()}")
    return proc.stdout.decode()


@dataclass
class Fs:
    """A filesystem to make in partition ``part`` (None: the whole disk)."""

    part: int | None
    fstype: str  # ext4, xfs, btrfs, vfat or "none" (an empty partition)
    label: str | None = None
    files: Mapping[str, str] = field(default_factory=lambda: dict(BASE_FILES))
    symlinks: Mapping[str, str] = field(default_factory=dict)
    # path -> "fifo", "chr" (/dev/null's numbers) or "link:<path>" (a hard link to another file)
    nodes: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Part:
    size_mib: int | None  # None: the rest
    type: str
    name: str | None = None


def partition_offsets(path: Path) -> dict[int, tuple[int, int]]:
    import json

    data = json.loads(sh("sfdisk", "--json", os.fspath(path)))["partitiontable"]
    out = {}
    for p in data["partitions"]:
        number = int("".join(ch for ch in p["node"][len(os.fspath(path)):] if ch.isdigit()))
        out[number] = (p["start"] * 512, p["size"] * 512)
    return out


@contextmanager
def loop(path: Path, offset: int = 0, size: int | None = None) -> Iterator[str]:
    argv = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size:
        argv += ["--sizelimit", str(size)]
    dev = sh(*argv, os.fspath(path)).strip()
    try:
        yield dev
    finally:
        sh("losetup", "--detach", dev)


@contextmanager
def mounted(dev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="test-populate-") as d:
        sh("mount", dev, d)
        try:
            yield Path(d)
        finally:
            sh("umount", d)


def populate(root: Path, fs: Fs) -> None:
    for rel, content in fs.files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
    for rel, target in fs.symlinks.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        os.symlink(target, p)
    for rel, kind in fs.nodes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(p)
        elif kind.startswith("link:"):
            os.link(root / kind[len("link:"):], p)
        else:
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))


def make_fs(path: Path, fs: Fs, offset: int, size: int) -> None:
    label = ["-L", fs.label] if fs.label else []
    if fs.fstype == "none":
        return
    if fs.fstype == "ext4":
        with tempfile.TemporaryDirectory(prefix="test-tree-") as tree:
            populate(Path(tree), fs)
            sh("mke2fs", "-q", "-F", "-t", "ext4", *label, "-d", tree, "-E", f"offset={offset}",
               os.fspath(path), f"{size // 1024}k")
        return
    with loop(path, offset, size) as dev:
        if fs.fstype == "xfs":
            sh("mkfs.xfs", "-q", "-f", *label, dev, env=XFS_SMALL_ENV)
        elif fs.fstype == "btrfs":
            sh("mkfs.btrfs", "-q", "-f", *label, dev)
        elif fs.fstype == "vfat":
            sh("mkfs.vfat", *(["-n", fs.label] if fs.label else []), dev)
            return
        else:
            raise ValueError(fs.fstype)
        with mounted(dev) as root:
            populate(root, fs)


def build_disk(path: Path, size_mib: int, label: str, parts: Sequence[Part], filesystems: Sequence[Fs]) -> Path:
    """A sparse disk image with a ``label`` ("gpt", "dos" or "none") table and the given filesystems."""
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    if label != "none":
        lines = [f"label: {label}"]
        for p in parts:
            spec = [f"size={p.size_mib}MiB"] if p.size_mib else []
            spec.append(f"type={p.type}")
            if p.name:
                spec.append(f"name={p.name}")
            lines.append(", ".join(spec))
        sh("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", os.fspath(path), input="\n".join(lines).encode())
    offsets = partition_offsets(path) if label != "none" else {}
    for fs in filesystems:
        offset, size = offsets[fs.part] if fs.part is not None else (0, size_mib * MIB)
        make_fs(path, fs, offset, size)
    return path


# --- the layouts the tests use -----------------------------------------------------------------

def gpt_root_first(path: Path, fstype: str = "ext4", size_mib: int = 160, root_mib: int | None = None) -> Path:
    label = "rootfs" if fstype == "xfs" else "cloudimg-rootfs"  # xfs labels hold 12 characters
    return build_disk(path, size_mib, "gpt", [Part(root_mib, ROOT_X86_64, "root")], [Fs(1, fstype, label)])


def rocky_like(path: Path) -> Path:
    """BIOS-less Rocky layout: EFI (vfat), /boot (xfs, XBOOTLDR), root (xfs, generic Linux type) as #3."""
    return build_disk(path, 200, "gpt", [Part(8, ESP, "EFI"), Part(70, XBOOTLDR, "boot"), Part(None, LINUX)],
                      [Fs(1, "vfat", "EFI", files={}), Fs(2, "xfs", "boot", files={"grub2/.keep": ""}),
                       Fs(3, "xfs", "rocky")])


def mbr_logical_root(path: Path, size_mib: int = 96) -> Path:
    """MBR: a small ext4 /boot as 1, the root as logical partition 5 in an extended container."""
    return build_disk(path, size_mib, "dos", [Part(8, "83"), Part(None, "5"), Part(None, "83")],
                      [Fs(1, "ext4", "boot", files={"grub/.keep": ""}), Fs(5, "ext4", None)])


def mbr_primary_root(path: Path, fstype: str = "ext4", size_mib: int = 160) -> Path:
    return build_disk(path, size_mib, "dos", [Part(None, "83")], [Fs(1, fstype, None)])


def separate_var(path: Path) -> Path:
    var_files = {"lib/cloud/.keep": "", "log/.keep": ""}
    root_files = {k: v for k, v in BASE_FILES.items() if not k.startswith("var/")} | {"var/.keep": ""}
    return build_disk(path, 128, "gpt", [Part(48, ROOT_X86_64, "root"), Part(None, VAR, "var")],
                      [Fs(1, "ext4", "cloudimg-rootfs", files=root_files), Fs(2, "ext4", "var", files=var_files)])


def no_linux_fs(path: Path) -> Path:
    return build_disk(path, 64, "gpt", [Part(16, ESP, "EFI"), Part(None, LINUX)],
                      [Fs(1, "vfat", "EFI", files={}), Fs(2, "none")])


def hostile(path: Path, links: Mapping[str, str], nodes: Mapping[str, str] | None = None) -> Path:
    files = {k: v for k, v in BASE_FILES.items() if not k.startswith("var/lib/cloud")}
    return build_disk(path, 64, "gpt", [Part(None, ROOT_X86_64, "root")],
                      [Fs(1, "ext4", "cloudimg-rootfs", files=files, symlinks=links, nodes=nodes or {})])


def blank(path: Path, size_mib: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    return path


# --- leak checks ---------------------------------------------------------------------------------

def loops_of(path: Path) -> str:
    return sh("losetup", "--associated", os.fspath(path)).strip()


def no_loops(path: Path, timeout: float = 5.0) -> bool:
    """True once no loop device is attached to ``path``.

    ``losetup --detach`` of a device that another process holds open (any blkid scanning all
    block devices on this shared machine does) only marks it for autoclear, so it may linger
    for a moment after a correct detach.
    """
    import time

    deadline = time.monotonic() + timeout
    while loops_of(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def backing_file(device: str) -> str | None:
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def our_mounts(*images: Path) -> list[str]:
    """Mounts made by the code under test (its mount points are cloudimage-guest-*/cloudimage-grow-*).

    With ``images``, only those of loop devices backed by them: other test runs on this shared
    machine mount their own guests at the same kind of mount point.
    """
    wanted = {os.path.realpath(i) for i in images}
    with open("/proc/mounts") as f:
        mounts = [ln for ln in f if "/cloudimage-guest-" in ln.split()[1] or "/cloudimage-grow-" in ln.split()[1]]
    if not wanted:
        return mounts
    return [ln for ln in mounts if backing_file(ln.split()[0]) in wanted]
