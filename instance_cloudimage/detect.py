"""Format detection from the image's content: a security boundary.

Never trust an extension, a Content-Type or qemu-img's probing.  Our own header inspector
decides; ``qemu-img info -f <detected>`` is only a second opinion (see inspect_with_qemu in
convert.py).  Formats we do not write are refused by name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .errors import UnsafeImage, UnsupportedFormat
from .formats import DiskFormat

QCOW_MAGIC = b"QFI\xfb"
# qcow2 header extension carrying an external data file name
QCOW2_EXT_DATA_FILE = 0x44415441
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_KNOWN = 0x1F

# Formats recognised only to be refused with a clear message.
REFUSED_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QEVM", "QED"),
    (0, b"LUKS\xba\xbe", "LUKS-encrypted"),
    (0, b"WithoutFreeSpace", "Parallels"),
    (0, b"WithouFreSpacExt", "Parallels"),
    (0, b"cloop", "cloop"),
    (0, b"koly", "DMG"),
)


@dataclass(frozen=True)
class DetectedImage:
    format: DiskFormat
    virtual_size: int
    details: str = ""


def _read_at(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def inspect_qcow2(fd: int, file_size: int) -> DetectedImage:
    """Parse and vet a qcow2 header.  Raises UnsafeImage for anything that reaches outside."""
    hdr = _read_at(fd, 0, 104)
    if len(hdr) < 72:
        raise UnsafeImage("qcow2 header is truncated")
    version, backing_off, backing_len, cluster_bits, size, crypt = struct.unpack(">IQIIQI", hdr[4:36])
    if version not in (2, 3):
        raise UnsupportedFormat(f"qcow version {version} images are not supported", "convert it to qcow2 v3")
    if backing_off != 0 or backing_len != 0:
        raise UnsafeImage("qcow2 image has a backing file, which could read host files",
                          "flatten it first: qemu-img convert -O qcow2 in out")
    if crypt != 0:
        raise UnsafeImage("qcow2 image is encrypted", "decrypt it before use")
    if not 9 <= cluster_bits <= 21:
        raise UnsafeImage(f"qcow2 cluster size 2^{cluster_bits} is invalid")
    header_len = 72
    if version == 3:
        if len(hdr) < 104:
            raise UnsafeImage("qcow2 v3 header is truncated")
        incompat = struct.unpack(">Q", hdr[72:80])[0]
        header_len = struct.unpack(">I", hdr[100:104])[0]
        if incompat & QCOW2_INCOMPAT_DATA_FILE:
            raise UnsafeImage("qcow2 image uses an external data file, which could read host files")
        if incompat & QCOW2_INCOMPAT_DIRTY:
            raise UnsafeImage("qcow2 image is marked dirty", "repair it with qemu-img check -r all")
        if incompat & QCOW2_INCOMPAT_CORRUPT:
            raise UnsafeImage("qcow2 image is marked corrupt")
        if incompat & ~QCOW2_INCOMPAT_KNOWN:
            raise UnsupportedFormat("qcow2 image uses unknown incompatible features")
        if header_len < 104 or header_len > 1 << cluster_bits:
            raise UnsafeImage("qcow2 header length is invalid")
    # Header extensions follow the header, up to the end of the first cluster.
    off, end = header_len, min(1 << cluster_bits, file_size)
    while off + 8 <= end:
        ext_type, ext_len = struct.unpack(">II", _read_at(fd, off, 8))
        if ext_type == 0:
            break
        if ext_type == QCOW2_EXT_DATA_FILE:
            raise UnsafeImage("qcow2 image names an external data file, which could read host files")
        off += 8 + ((ext_len + 7) & ~7)
    if file_size < 1 << cluster_bits:
        raise UnsafeImage("qcow2 image is truncated (smaller than one cluster)")
    return DetectedImage(DiskFormat.QCOW2, size, f"qcow2 v{version}")


def detect_format(fd: int) -> DetectedImage:
    """Detect the disk format of an open, verified image file.

    Raises UnsupportedFormat for formats we recognise but do not write, UnsafeImage for
    images that could make qemu-img read beyond the file.
    """
    size = os.fstat(fd).st_size
    head = _read_at(fd, 0, 512)
    if head[:4] == QCOW_MAGIC:
        return inspect_qcow2(fd, size)
    if head[:4] == b"KDMV" or head[:21] == b"# Disk DescriptorFile":
        raise UnsupportedFormat("VMDK images are not supported yet")
    if head[64:68] == b"\x7f\x10\xda\xbe":
        raise UnsupportedFormat("VDI images are not supported yet")
    if head[:8] == b"vhdxfile":
        raise UnsupportedFormat("VHDX images are not supported yet")
    if _read_at(fd, max(size - 512, 0), 8) == b"conectix" or head[:8] == b"conectix":
        raise UnsupportedFormat("VHD images are not supported yet")
    for offset, magic, name in REFUSED_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            raise UnsupportedFormat(f"{name} images are not supported",
                                    "convert it to qcow2 or raw first")
    return DetectedImage(DiskFormat.RAW, size, "raw")
