"""The VMDK inspector: single-file sparse VMDKs only (monolithicSparse, streamOptimized).

A VMDK descriptor can name other files as extents (``RW 2048 FLAT "/etc/shadow" 0``) and a
parent disk; qemu follows both even with ``-f vmdk`` (CVE-2022-47951).  So text descriptors are
refused outright, and the descriptor embedded in a sparse file must describe exactly one sparse
extent, no parent, and an allowed create type (image-safety.md §C.14, §C.16).
"""

from __future__ import annotations

import re

from .errors import UnsafeImage, UnsupportedFormat
from .formats import DetectedImage, DiskFormat
from .imagefile import ImageFile

MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
ALLOWED_TYPES = ("monolithicSparse", "streamOptimized")
MAX_DESCRIPTOR_SECTORS = 2048  # 1 MiB, as qemu
HEADER_FMT = "<4sIIQQQQIQQQB4sH"
MARKER_FOOTER = 3
MARKER_EOS = 0
EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]*)"(\s+\d+)?$')
HEADER_LINE_RE = re.compile(r'^[A-Za-z][A-Za-z0-9_.]*\s*=\s*("[^"]*"|\S*)$')


def refuse(message: str, hint: str | None = None) -> UnsafeImage:
    return UnsafeImage(f"VMDK image {message}", hint)


def parse_descriptor(text: str) -> tuple[str, list[tuple[str, int, str, str]]]:
    """Return (createType, extents) of a descriptor, refusing every line we do not understand."""
    fields: dict[str, str] = {}
    extents: list[tuple[str, int, str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = EXTENT_RE.match(line)
        if m:
            extents.append((m.group(1), int(m.group(2)), m.group(3), m.group(4)))
            continue
        if line.startswith("ddb.") or HEADER_LINE_RE.match(line):
            key, _, value = line.partition("=")
            fields[key.strip().lower()] = value.strip().strip('"')
            continue
        raise refuse("has a descriptor line that is not understood")
    create_type = fields.get("createtype", "")
    if create_type not in ALLOWED_TYPES:
        raise UnsupportedFormat(f"VMDK create type {create_type[:32] or '(none)'} is not supported",
                                "only monolithicSparse and streamOptimized VMDKs are; "
                                "convert it: qemu-img convert -O qcow2")
    if fields.get("parentcid", "ffffffff").lower() != "ffffffff" or "parentfilenamehint" in fields:
        raise refuse("has a parent disk, which could copy host files into the instance",
                      "flatten it first: qemu-img convert -O qcow2")
    return create_type, extents


def read_descriptor(img: ImageFile, desc_sector: int, desc_sectors: int) -> str:
    if desc_sector != 1 or not 1 <= desc_sectors <= MAX_DESCRIPTOR_SECTORS:
        raise refuse("has its descriptor at an unexpected place")
    data = img.read_at(512, desc_sectors * 512).split(b"\0", 1)[0]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("has a descriptor that is not text") from None


def footer_header(img: ImageFile) -> tuple[int, ...]:
    """streamOptimized files written in one pass put the real header in a footer at the end."""
    if img.size < 2048:
        raise refuse("is truncated (no footer)")
    base = img.size - 1536
    _val, size, mtype = img.unpack("<QII", base)
    eos_val, eos_size, eos_type = img.unpack("<QII", img.size - 512)
    if (size, mtype) != (0, MARKER_FOOTER) or (eos_val, eos_size, eos_type) != (0, 0, MARKER_EOS):
        raise refuse("is truncated: its footer is missing", "download it again; check its checksum")
    footer = img.unpack(HEADER_FMT, base + 512)
    if footer[0] != MAGIC:
        raise refuse("has an invalid footer")
    return footer


def inspect_vmdk(img: ImageFile) -> DetectedImage:
    """Vet a whole VMDK file.  Raises UnsafeImage or UnsupportedFormat."""
    header = img.unpack(HEADER_FMT, 0)
    (magic, version, flags, capacity, grain, desc_sector, desc_sectors, gtes_per_gt, _rgd, gd_offset,
     _overhead, unclean, newline_check, _compress) = header
    if magic != MAGIC:
        raise refuse("has no VMDK magic")
    if version not in (1, 2, 3):
        raise UnsupportedFormat(f"VMDK version {version} images are not supported")
    if flags & 1 and newline_check != b"\n \r\n":
        raise refuse("was corrupted by a text-mode transfer (newline check failed)")
    create_type, extents = parse_descriptor(read_descriptor(img, desc_sector, desc_sectors))
    if len(extents) != 1 or extents[0][2] != "SPARSE" or "/" in extents[0][3]:
        raise refuse("must have exactly one sparse extent inside the file")
    if gd_offset == GD_AT_END:
        footer = footer_header(img)
        if footer[3] != capacity or footer[4] != grain:
            raise refuse("has a footer that disagrees with its header")
        gd_offset, unclean = footer[9], footer[11]
    if unclean:
        raise refuse("is marked as not cleanly closed")
    if capacity <= 0 or not 1 <= grain <= 2048 or grain & (grain - 1) or not 1 <= gtes_per_gt <= 4096:
        raise refuse("has an invalid geometry")
    grain_tables = -(-capacity // (grain * gtes_per_gt))
    if grain_tables:
        img.read_at(gd_offset * 512 + 4 * (grain_tables - 1), 4)  # the grain directory is in the file
    return DetectedImage(DiskFormat.VMDK, capacity * 512, f"vmdk {create_type}")


def looks_like_descriptor(head: bytes) -> bool:
    """What qemu's vmdk probe accepts as a text descriptor: comments/blank lines, then version=N."""
    for line in head[:4096].split(b"\n"):
        stripped = line.strip(b" \r")
        if line.startswith(b"#") or not stripped:
            continue
        return stripped.startswith(b"version=")
    return False
