"""The closed sets of disk formats and wrappers we know, and what detection concluded."""

from __future__ import annotations

from dataclasses import dataclass
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
    """Compression and archive layers around a disk image, detected by their magic bytes."""

    GZIP = "gzip"
    XZ = "xz"
    BZIP2 = "bzip2"
    ZSTD = "zstd"
    TAR = "tar"


# Names an administrator or user may declare; "vhd" is accepted for qemu's "vpc".
DECLARABLE_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhd", "vpc", "vhdx")

# Formats qemu-img must convert: they need random access to the whole file.
RANDOM_ACCESS_FORMATS = frozenset({DiskFormat.QCOW2, DiskFormat.VMDK, DiskFormat.VDI, DiskFormat.VPC,
                                   DiskFormat.VHDX})


def normalize_declared(name: str) -> DiskFormat:
    return DiskFormat.VPC if name == "vhd" else DiskFormat(name)


def display_name(fmt: DiskFormat) -> str:
    """The name users know: qemu's "vpc" is a VHD."""
    return "vhd" if fmt is DiskFormat.VPC else fmt.value


@dataclass(frozen=True)
class DetectedImage:
    """What our inspector concluded about an image's content.

    ``virtual_size`` is the disk size the image describes (for raw: its length, 0 while a stream
    has not been read to the end).  ``raw_data_size`` is set when the image is raw data followed
    by metadata (a fixed VHD): only that many leading bytes are disk content.
    """

    format: DiskFormat
    virtual_size: int
    details: str
    raw_data_size: int | None = None

    @property
    def needs_qemu(self) -> bool:
        """True when qemu-img must convert it; raw data (also a fixed VHD's) is copied as is."""
        return self.format in RANDOM_ACCESS_FORMATS and self.raw_data_size is None
