"""Format detection from the image's content: a security boundary.

Never trust an extension, a Content-Type or qemu-img's probing.  Every signature qemu's probes
look for (all at the start of the file) is checked, plus the raw layouts (MBR, GPT, ISO 9660/UDF);
a file carrying more than one (an ISO whose system area holds a qcow2 header, a "raw" image
starting with a VMDK header) is refused, since qemu, libmagic and a guest would each read it
differently.  The per-format inspectors then vet the whole file; ``qemu-img info -f <detected>``
is only a second opinion (convert.inspect_with_qemu).  libmagic only describes content in
messages: it calls such a polyglot "ISO 9660".
"""

from __future__ import annotations

import logging
import struct

from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DetectedImage, DiskFormat
from instance_cloudimage.image.qcow2 import inspect_qcow2
from instance_cloudimage.image.vhd import fixed_vhd_data_size, inspect_vdi, inspect_vhd, inspect_vhdx
from instance_cloudimage.image.vmdk import inspect_vmdk, looks_like_descriptor
from instance_cloudimage.runtime.errors import UnsafeImage, UnsupportedFormat

log = logging.getLogger(__name__)

# Enough for every signature: ISO 9660/UDF volume descriptors sit in 32..64 KiB.
HEAD_SIZE = 128 * 1024
CONVERT_HINT = "convert it to qcow2 or raw first"

# Signatures at offset 0 that qemu recognises; None = a format we recognise only to refuse it.
MAGICS: tuple[tuple[bytes, str, DiskFormat | None], ...] = (
    (b"KDMV", "vmdk", DiskFormat.VMDK),
    (b"COWD", "VMDK version 3 (ESX COWD)", None),
    (b"conectix", "vhd", DiskFormat.VPC),
    (b"vhdxfile", "vhdx", DiskFormat.VHDX),
    (b"QED\0", "QED", None),
    (b"LUKS\xba\xbe", "LUKS-encrypted", None),
    (b"WithoutFreeSpace", "Parallels", None),
    (b"WithouFreSpacExt", "Parallels", None),
    (b"Bochs Virtual HD Image", "Bochs", None),
    (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop", None),
)
VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)
ISO_IDS = (b"CD001", b"BEA01", b"NSR02", b"NSR03")
# Bytes that never occur in text files (as file(1) judges): a disk image always has some.
TEXT_BYTES = bytes([7, 8, 9, 10, 12, 13, 27]) + bytes(range(0x20, 0x100))


def container_signatures(head: bytes) -> list[tuple[str, DiskFormat | None]]:
    found: list[tuple[str, DiskFormat | None]] = []
    if head[:4] == b"QFI\xfb":
        version = struct.unpack(">I", head[4:8])[0] if len(head) >= 8 else 0
        if version in (2, 3):
            found.append(("qcow2", DiskFormat.QCOW2))
        else:
            found.append(("qcow (version 1)" if version == 1 else f"qcow2 version {version}", None))
    found += [(name, fmt) for magic, name, fmt in MAGICS if head.startswith(magic)]
    if head[0x40:0x44] == VDI_SIGNATURE:
        found.append(("vdi", DiskFormat.VDI))
    if not found and looks_like_descriptor(head):
        found.append(("VMDK descriptor (flat or split extents in other files)", None))
    return found


def raw_layouts(head: bytes) -> list[str]:
    found = []
    if head[510:512] == b"\x55\xaa":
        entries = [head[446 + 16 * i:462 + 16 * i] for i in range(4)]
        if all(e[0] in (0, 0x80) for e in entries) and any(e[4] for e in entries):
            found.append("MBR")
    if head[512:520] == b"EFI PART" or head[4096:4104] == b"EFI PART":
        found.append("GPT")
    if any(head[0x8001 + 2048 * i:0x8006 + 2048 * i] in ISO_IDS for i in range(16)):
        found.append("ISO 9660")
    return found


def describe_content(head: bytes) -> str:
    """libmagic's description, for messages only (it never decides)."""
    try:
        import magic

        return str(magic.from_buffer(head))[:80]
    except Exception:  # a diagnostic must never fail the create
        return "unknown content"


def identify(head: bytes) -> DetectedImage:
    """Identify the format from the first HEAD_SIZE bytes (or the whole image if shorter).

    Raises UnsafeImage when several formats match or the content is text, UnsupportedFormat for
    formats we recognise but do not write.  A random-access format still needs inspect_file.
    """
    containers = container_signatures(head)
    layouts = raw_layouts(head)
    if len(containers) > 1 or (containers and layouts):
        names = ", ".join([n for n, _ in containers] + layouts)
        raise UnsafeImage(f"image content matches several formats ({names}); "
                          "a file that tools read differently is refused")
    if containers:
        name, fmt = containers[0]
        if fmt is None:
            raise UnsupportedFormat(f"{name} images are not supported", CONVERT_HINT)
        return DetectedImage(fmt, 0, name)
    if not head:
        raise UnsafeImage("image is empty")
    if not head[:64 * 1024].translate(None, TEXT_BYTES):
        raise UnsafeImage(f"image is text, not a disk image ({describe_content(head)})",
                          "check the image URL or path")
    if layouts:
        return DetectedImage(DiskFormat.RAW, 0, f"raw ({', '.join(layouts)})")
    log.info("raw image has no partition table or ISO 9660 volume (libmagic: %s)", describe_content(head))
    return DetectedImage(DiskFormat.RAW, 0, "raw")


def check_tail(tail: bytes, total: int) -> int | None:
    """Look at the last 512 bytes of a raw image of ``total`` bytes.

    Returns the data size if it is a fixed VHD (raw data plus a footer); raises UnsupportedFormat
    for a DMG (its "koly" trailer is only at the end).
    """
    if tail[:4] == b"koly":
        raise UnsupportedFormat("DMG images are not supported", CONVERT_HINT)
    return fixed_vhd_data_size(tail, total)


INSPECTORS = {
    DiskFormat.QCOW2: inspect_qcow2,
    DiskFormat.VMDK: inspect_vmdk,
    DiskFormat.VPC: inspect_vhd,
    DiskFormat.VHDX: inspect_vhdx,
    DiskFormat.VDI: inspect_vdi,
}


def inspect_file(img: ImageFile) -> DetectedImage:
    """Detect and vet a whole image file.  Raises UnsafeImage or UnsupportedFormat."""
    found = identify(img.read_upto(0, HEAD_SIZE))
    if found.format is not DiskFormat.RAW:
        return INSPECTORS[found.format](img)
    if img.size >= 1024 and check_tail(img.read_at(img.size - 512, 512), img.size) is not None:
        return inspect_vhd(img)
    return DetectedImage(DiskFormat.RAW, img.size, found.details)
