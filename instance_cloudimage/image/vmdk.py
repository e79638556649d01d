"""The VMDK inspector: single-file sparse VMDKs only (monolithicSparse, streamOptimized).

A VMDK descriptor can name other files as extents (``RW 2048 FLAT "/etc/shadow" 0``) and a
parent disk; qemu follows both even with ``-f vmdk`` (CVE-2022-47951).  So text descriptors are
refused outright, and the descriptor embedded in a sparse file must describe exactly one sparse
extent, no parent, and an allowed create type.  Every grain table
and grain must lie inside the file: qemu reads beyond the end as zeros, so a cut download would
otherwise convert "successfully".
"""

from __future__ import annotations

import re

from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DetectedImage, DiskFormat
from instance_cloudimage.runtime.errors import UnsafeImage, UnsupportedFormat

MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
ALLOWED_TYPES = ("monolithicSparse", "streamOptimized")
MAX_DESCRIPTOR_SECTORS = 2048  # 1 MiB, as qemu
HEADER_FMT = "<4sIIQQQQIQQQB4sH"
MARKER_FOOTER = 3
MARKER_EOS = 0
FLAG_ZEROED_GRAINS = 1 << 2  # a grain table entry of 1 is an all-zero grain
FLAG_MARKERS = 1 << 17  # streamOptimized: each compressed grain starts with (lba u64, size u32)
COMPRESSION_DEFLATE = 1
# ASCII digits, at most 20 (a u64): int() takes other scripts' digits and refuses 4300 or more.
EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+([0-9]{1,20})\s+(\w+)\s+"([^"]*)"(\s+[0-9]{1,20})?$')
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
     _overhead, unclean, newline_check, compress) = header
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
    last = last_grain(img, gd_offset, grain_tables, gtes_per_gt, flags)
    if last:
        end = last * 512 + grain * 512
        if compress == COMPRESSION_DEFLATE:
            # Compressed grains vary in length; only streamOptimized's markers say how long.
            end = last * 512 + (12 + img.unpack("<QI", last * 512)[1] if flags & FLAG_MARKERS else 1)
        if end > img.size:
            raise refuse(f"is truncated: it maps a grain at offset {last * 512} that runs beyond the end of "
                         f"the file ({img.size} bytes)", "download it again; check its checksum")
    return DetectedImage(DiskFormat.VMDK, capacity * 512, f"vmdk {create_type}")


def last_grain(img: ImageFile, gd_offset: int, grain_tables: int, gtes_per_gt: int, flags: int) -> int:
    """The highest sector any grain table maps (0 if none); each table must lie in the file.

    A table named twice is read once, so the work is bounded by the file's size."""
    checked: set[int] = set()
    last = 0
    for table in img.read_array(gd_offset * 512, grain_tables, "<I"):
        if table and table not in checked:
            checked.add(table)
            last = max(last, *img.read_array(table * 512, gtes_per_gt, "<I"))
    return 0 if last == 1 and flags & FLAG_ZEROED_GRAINS else last


def looks_like_descriptor(head: bytes) -> bool:
    """What qemu's vmdk probe accepts as a text descriptor: comments/blank lines, then version=N."""
    for line in head[:4096].split(b"\n"):
        stripped = line.strip(b" \r")
        if line.startswith(b"#") or not stripped:
            continue
        return stripped.startswith(b"version=")
    return False
