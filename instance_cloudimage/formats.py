"""The closed sets of disk formats and wrappers we know."""

from __future__ import annotations

from enum import StrEnum


class DiskFormat(StrEnum):
    """Disk formats, named as qemu-img's ``-f`` argument spells them."""

    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VDI = "vdi"
    VPC = "vpc"  # VHD
    VHDX = "vhdx"


class Wrapper(StrEnum):
    GZIP = "gzip"
    XZ = "xz"
    BZIP2 = "bzip2"
    ZSTD = "zstd"
    TAR = "tar"


# Names an administrator or user may declare; "vhd" is accepted for qemu's "vpc".
DECLARABLE_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhd", "vpc", "vhdx")


def normalize_declared(name: str) -> DiskFormat:
    return DiskFormat.VPC if name == "vhd" else DiskFormat(name)
