"""Reading a disk's partition table and choosing the filesystem that holds ``/var/lib/cloud``.

The table comes from ``sfdisk -J`` (GPT and MBR, logical partitions included; never kpartx, which
needs device-mapper), the filesystems from ``blkid -p`` at each partition's offset.  The choice
never relies on a partition number: a separate /var partition by its GPT type, the root by its
per-architecture GPT type, then Linux-typed partitions (GPT generic, MBR 0x83), then a root-like
label, then the largest Linux filesystem.  An unpartitioned filesystem image is one "partition"
covering the whole disk.

Security: the table and filesystems come from an untrusted image.  Everything read here is
bounds-checked against the disk's size and only describes byte ranges of that disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from instance_cloudimage.disk.convert import target_size
from instance_cloudimage.runtime.errors import CommandError, SeedError
from instance_cloudimage.runtime.log import format_size
from instance_cloudimage.runtime.process import run

log = logging.getLogger(__name__)

# GPT partition type GUIDs (UAPI Discoverable Partitions Specification).
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
VAR = "4D21B016-B534-45C2-A9FB-5C16E091FD2D"
VAR_TMP = "7EC6F557-3BC5-4ACA-B293-16EF5DF639D1"
HOME = "933AC7E1-2EB4-4F13-B844-0E14E2AEF915"
SRV = "3B8F8425-20E0-4F3B-907F-1A25A76F98E8"
SWAP = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"

# Root partition type per machine name (uname -m, as the arch parameter spells it).
ROOT_TYPES = {
    "x86_64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "i686": "44479540-F297-41B2-9AF7-D131D5F0458A",
    "i386": "44479540-F297-41B2-9AF7-D131D5F0458A",
    "aarch64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
    "armv7l": "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3",
    "ppc64le": "C31C45E6-3F39-412E-80FB-4809C4980599",
    "ppc64": "912ADE1D-A839-4913-8964-A10EEE08FBD2",
    "riscv64": "72EC70A6-CF74-40E6-BD49-4BDA08E8F224",
    "s390x": "5EEAD9A9-FE09-4A1E-A1D7-520D00531306",
    "loongarch64": "77055800-792C-4F94-B39A-98C91B762BB6",
}
# Partitions that are Linux filesystems but never the root.
NOT_ROOT_TYPES = {ESP, XBOOTLDR, BIOS_BOOT, VAR, VAR_TMP, HOME, SRV, SWAP, LVM}
# MBR types: Linux, and the extended containers that sfdisk lists next to their logical partitions.
MBR_LINUX = "83"
MBR_EXTENDED = {"5", "f", "85"}
MBR_NOT_ROOT = {"ef", "82", "8e"}
GPT_ENTRIES = 128  # the table length sfdisk does not name

LINUX_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs")
# Labels that distribution cloud images give their root filesystem.
ROOT_LABELS = {"cloudimg-rootfs", "root", "rootfs", "img-rootfs", "ROOT", "rocky", "almalinux", "fedora"}
BOOT_LABELS = {"boot", "BOOT", "efi", "EFI", "ESP", "UEFI"}


@dataclass(frozen=True)
class Partition:
    """A byte range of the disk and what lives in it.  ``number`` is for messages only."""

    number: int | None  # None: the whole disk (an unpartitioned filesystem image)
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID (upper case), MBR type (hex, lower case) or "" for a whole disk
    fstype: str | None = None
    label: str | None = None

    @property
    def end(self) -> int:
        return self.start + self.size

    def describe(self) -> str:
        where = "the whole disk" if self.number is None else f"partition {self.number}"
        what = self.fstype or "no filesystem"
        label = f" labelled {self.label}" if self.label else ""
        return f"{where} ({what}{label}, {format_size(self.size)})"


@dataclass(frozen=True)
class PartitionTable:
    label: str  # "gpt", "dos" or "none"
    sector_size: int
    disk_size: int
    partitions: tuple[Partition, ...]
    last_lba: int | None = None  # GPT: last usable sector as the table records it
    first_lba: int | None = None  # GPT: first usable sector
    table_length: int | None = None  # GPT: entries the table holds (sfdisk names it only when not 128)

    def get(self, number: int) -> Partition:
        for p in self.partitions:
            if p.number == number:
                return p
        raise KeyError(number)


@dataclass(frozen=True)
class GuestLayout:
    """The partitions to mount: the root, and a separate /var when the image has one."""

    root: Partition
    var: Partition | None
    table: PartitionTable


def _node_number(node: str) -> int:
    digits = ""
    for ch in reversed(node):
        if not ch.isdigit():
            break
        digits = ch + digits
    if not digits:
        raise SeedError(f"sfdisk reported a partition without a number ({node!r})")
    return int(digits)


def probe_filesystem(path: str, offset: int = 0, size: int | None = None) -> dict[str, str]:
    """``blkid -p`` at a byte range: TYPE, LABEL, ... or {} when nothing (or something ambiguous) is there."""
    argv = ["blkid", "-p", "-o", "export", "-O", str(offset)]
    if size is not None:
        argv += ["-S", str(size)]
    # blkid exits 2 when it finds nothing and 8 when signatures contradict each other.
    proc = run([*argv, path], check=False)
    if proc.returncode != 0:
        return {}
    out: dict[str, str] = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def _parse_sfdisk(data: dict[str, Any], disk_size: int) -> PartitionTable:
    pt = data.get("partitiontable")
    if not isinstance(pt, dict):
        raise SeedError("sfdisk returned no partition table")
    sector = int(pt.get("sectorsize", 512))
    if sector not in (512, 1024, 2048, 4096):
        raise SeedError(f"unsupported sector size {sector} in the partition table")
    parts = []
    for raw in pt.get("partitions", []):
        start = int(raw["start"]) * sector
        size = int(raw["size"]) * sector
        if start < 0 or size <= 0 or start + size > disk_size:
            raise SeedError(f"partition {_node_number(str(raw.get('node', '')))} lies outside the disk; "
                            "the image's partition table is damaged")
        parts.append(Partition(number=_node_number(str(raw.get("node", ""))), start=start, size=size,
                               type=str(raw.get("type", "")).upper() if pt.get("label") == "gpt"
                               else str(raw.get("type", "")).lower()))
    last_lba = int(pt["lastlba"]) if "lastlba" in pt else None
    first_lba = int(pt["firstlba"]) if "firstlba" in pt else None
    length = int(pt.get("table-length", GPT_ENTRIES)) if pt.get("label") == "gpt" else None
    return PartitionTable(label=str(pt.get("label", "")), sector_size=sector, disk_size=disk_size,
                          partitions=tuple(parts), last_lba=last_lba, first_lba=first_lba, table_length=length)


def read_partition_table(path: str, *, probe: bool = True) -> PartitionTable:
    """Read the table of a disk (block device or image file) and probe each partition's filesystem
    (with ``probe`` false, only the table: no partition's fstype or label).

    A disk with no table but a filesystem at offset 0 yields one whole-disk partition; an empty
    disk yields no partitions.  Raises SeedError on a table sfdisk cannot read.
    """
    disk_size = target_size(path)
    whole = probe_filesystem(path)
    if "PTTYPE" not in whole:
        if whole.get("TYPE"):
            return PartitionTable("none", 512, disk_size, (
                Partition(None, 0, disk_size, "", whole.get("TYPE"), whole.get("LABEL")),))
        return PartitionTable("none", 512, disk_size, ())
    try:
        out = run(["sfdisk", "--json", path]).stdout
    except CommandError as e:
        raise SeedError(f"the partition table on {path} cannot be read: {e.stderr.strip() or e}") from None
    table = _parse_sfdisk(json.loads(out), disk_size)
    if not probe:
        return table
    probed = []
    for p in table.partitions:
        if table.label == "dos" and p.type in MBR_EXTENDED:
            probed.append(p)
            continue
        fs = probe_filesystem(path, p.start, p.size)
        probed.append(Partition(p.number, p.start, p.size, p.type, fs.get("TYPE"), fs.get("LABEL")))
    return dataclasses.replace(table, partitions=tuple(probed))


def _is_linux_fs(p: Partition) -> bool:
    return p.fstype in LINUX_FILESYSTEMS


def _root_candidates(table: PartitionTable, arch: str) -> list[Partition]:
    """Linux filesystems that may be the root, best first.  Never decided by partition number."""
    linux = [p for p in table.partitions if _is_linux_fs(p)]
    own_root = ROOT_TYPES.get(arch)
    foreign_roots = set(ROOT_TYPES.values()) - {own_root}

    def rank(p: Partition) -> tuple[int, int, int]:
        if own_root is not None and p.type == own_root:
            tier = 0
        elif p.type in foreign_roots:
            tier = 1
        elif p.type in (LINUX_DATA, MBR_LINUX, ""):
            tier = 2
        elif p.type in NOT_ROOT_TYPES or p.type in MBR_NOT_ROOT:
            tier = 4
        else:
            tier = 3
        label = 0 if p.label in ROOT_LABELS else 2 if p.label in BOOT_LABELS else 1
        return (tier, label, -p.size)

    return sorted(linux, key=rank)


def choose_guest_layout(table: PartitionTable, arch: str) -> GuestLayout:
    """Pick the root filesystem and a separate /var.  Raises SeedError when there is no Linux filesystem."""
    candidates = _root_candidates(table, arch)
    if not candidates:
        raise SeedError(no_linux_filesystem_message(table))
    root = candidates[0]
    if root.type in NOT_ROOT_TYPES or root.type in MBR_NOT_ROOT:
        raise SeedError(f"no root filesystem found: the only Linux filesystem is {root.describe()}")
    own_root = ROOT_TYPES.get(arch)
    if root.type in ROOT_TYPES.values() and root.type != own_root:
        log.warning("the image's root partition is typed for another architecture than %s", arch)
    var = next((p for p in table.partitions if p.type == VAR and _is_linux_fs(p)), None)
    return GuestLayout(root=root, var=var, table=table)


def no_linux_filesystem_message(table: PartitionTable) -> str:
    found = ", ".join(p.describe() for p in table.partitions) or "nothing"
    if table.label == "dos" and any(p.type == "ee" for p in table.partitions):
        return ("only the protective MBR of a GPT disk is readable: the GPT is damaged or the image "
                f"is truncated (found: {found})")
    if any(p.fstype == "LVM2_member" for p in table.partitions):
        return (f"the image keeps its filesystems in LVM, which this node cannot reach without "
                f"device-mapper (found: {found})")
    return f"no ext4, xfs or btrfs filesystem on the disk (found: {found})"


def find_guest_layout(disk_path: str, arch: str) -> GuestLayout:
    """Read ``disk_path``'s table and choose the filesystems to mount.  Raises SeedError."""
    table = read_partition_table(disk_path)
    layout = choose_guest_layout(table, arch)
    log.debug("guest root is %s%s", layout.root.describe(),
              f", /var is {layout.var.describe()}" if layout.var else "")
    return layout
