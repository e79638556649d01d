"""The qcow2 header inspector (qemu docs/interop/qcow2.txt), written for hostile input.

Refuses everything that makes qemu read outside the file (backing file, external data file),
encryption, dirty/corrupt images, unknown incompatible features, and truncated files: every L2
table and data cluster must lie inside the file, since qemu reads beyond the end as zeros and a
cut download would otherwise convert "successfully".
"""

from __future__ import annotations

import struct

from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DetectedImage, DiskFormat
from instance_cloudimage.runtime.errors import UnsafeImage, UnsupportedFormat

MAGIC = b"QFI\xfb"
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
EXT_END = 0
EXT_DATA_FILE = 0x44415441
EXT_CRYPTO = 0x0537BE77
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED = 1 << 62
# Beyond this many header extensions a header is hostile, not large.
MAX_EXTENSIONS = 64


def refuse(message: str, hint: str | None = None) -> UnsafeImage:
    return UnsafeImage(f"qcow2 image {message}", hint)


def check_header(img: ImageFile) -> tuple[int, int, int, int, int]:
    """Vet the fixed header; return (version, cluster_bits, virtual size, l1 size, l1 offset)."""
    (magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off, rc_off,
     rc_clusters, nb_snap, snap_off) = img.unpack(">4sIQIIQIIQQIIQ", 0)
    if magic != MAGIC:
        raise refuse("has no qcow2 magic")
    if version == 1:
        raise UnsupportedFormat("qcow (version 1) images are not supported",
                                "convert it: qemu-img convert -f qcow -O qcow2 in out")
    if version not in (2, 3):
        raise UnsupportedFormat(f"qcow2 version {version} images are not supported")
    if backing_off != 0 or backing_len != 0:
        raise refuse("has a backing file, which could copy host files into the instance",
                     "flatten it first: qemu-img convert -O qcow2 in out")
    if crypt != 0:
        raise refuse("is encrypted", "decrypt it first: qemu-img convert with --object secret")
    if not 9 <= cluster_bits <= 21:
        raise refuse(f"has an invalid cluster size (2^{cluster_bits})")
    cluster = 1 << cluster_bits
    if img.size < cluster:
        raise refuse(f"is truncated: {img.size} bytes is less than one cluster ({cluster} bytes)")
    if rc_off % cluster or l1_off % cluster:
        raise refuse("has misaligned metadata tables")
    if rc_clusters:
        img.read_at(rc_off + rc_clusters * cluster - 8, 8)  # the refcount table lies inside the file
    if nb_snap:
        img.read_at(snap_off, 8)
    header_len = 72
    if version == 3:
        incompat, _compat, _autoclear, _rc_order, header_len = img.unpack(">QQQII", 72)
        if incompat & INCOMPAT_DATA_FILE:
            raise refuse("uses an external data file, which could copy host files into the instance")
        if incompat & INCOMPAT_DIRTY:
            raise refuse("is marked dirty (not cleanly closed)", "repair it with qemu-img check -r all")
        if incompat & INCOMPAT_CORRUPT:
            raise refuse("is marked corrupt", "repair it with qemu-img check -r all")
        if incompat & ~INCOMPAT_KNOWN:
            raise UnsupportedFormat(f"qcow2 image uses unknown incompatible features ({incompat:#x})")
        if not 104 <= header_len <= cluster or header_len % 8:
            raise refuse(f"has an invalid header length ({header_len})")
    check_extensions(img, header_len, cluster)
    return version, cluster_bits, size, l1_size, l1_off


def check_extensions(img: ImageFile, offset: int, cluster: int) -> None:
    """Header extensions fill the rest of the first cluster; refuse the ones naming other files."""
    for _ in range(MAX_EXTENSIONS):
        if offset + 8 > cluster:
            return
        ext_type, ext_len = img.unpack(">II", offset)
        if ext_type == EXT_END:
            return
        if ext_type == EXT_DATA_FILE:
            raise refuse("names an external data file, which could copy host files into the instance")
        if ext_type == EXT_CRYPTO:
            raise refuse("is encrypted", "decrypt it first")
        offset += 8 + ((ext_len + 7) & ~7)
    raise refuse("has too many header extensions")


FLAG_BITS = bytes(b & 0x40 for b in range(256))  # an entry's first byte: keep COMPRESSED (bit 62)
WITHOUT_FLAGS = bytes(b & 0x3F for b in range(256))  # ...or drop it and COPIED (bit 63)


def maps_inside(table: bytes, entry_size: int, cluster: int, file_size: int) -> bool:
    """True if no entry of an L2 table is compressed and each maps a cluster inside the file.

    Done in C (byte slicing, translate, one max), as a Python loop over 2 GiB's entries costs ~5 ms
    of every create.  Without its two flag bits an entry is at least its offset, so a maximum
    that fits proves every entry fits; False only means the exact loop must decide."""
    raw = bytearray(table)
    firsts = raw[0::entry_size]
    if firsts.translate(FLAG_BITS).strip(b"\0"):
        return False
    raw[0::entry_size] = firsts.translate(WITHOUT_FLAGS)
    highest: int = max(struct.unpack(f">{len(raw) // 8}Q", raw)[::entry_size // 8])
    return highest + cluster <= file_size


def check_clusters(img: ImageFile, cluster_bits: int, size: int, l1_size: int, l1_off: int,
                   extended_l2: bool) -> None:
    """Every L2 table and data cluster the image maps must start inside the file."""
    cluster = 1 << cluster_bits
    entry_size = 16 if extended_l2 else 8
    l2_entries = cluster // entry_size
    needed = -(-size // (cluster * l2_entries))
    if l1_size < needed:
        raise refuse(f"has an L1 table too small for its virtual size ({l1_size} < {needed} entries)")
    if l1_size > needed + (1 << 20):
        raise refuse(f"has an implausibly large L1 table ({l1_size} entries)")
    compressed_bits = 62 - (cluster_bits - 8)
    # Only the entries mapping the virtual size are ever read by qemu, and each distinct L2 table
    # is checked once: 2^20 L1 entries naming one 2 MiB table would otherwise cost an hour of CPU
    # for a 21 MB file.  So the work is bounded by the file's size.
    checked: set[int] = set()
    for entry in img.read_array(l1_off, needed, ">Q"):
        l2_off = entry & OFFSET_MASK
        if not l2_off or l2_off in checked:
            continue
        checked.add(l2_off)
        if l2_off % cluster:
            raise refuse("has a misaligned L2 table")
        table = img.read_at(l2_off, cluster)
        if maps_inside(table, entry_size, cluster, img.size):
            continue
        words = struct.unpack(f">{cluster // 8}Q", table)
        for i in range(0, len(words), entry_size // 8):
            e = words[i]
            if e & COMPRESSED:
                # The data runs over nb sectors from host; qemu pads a short last sector with
                # zeros, so only that sector's first byte must be in the file.
                host = e & ((1 << compressed_bits) - 1)
                sectors = (e >> compressed_bits & ((1 << (cluster_bits - 8)) - 1)) + 1
                end = ((host >> 9) + sectors - 1) * 512 + 1
            else:
                host = e & OFFSET_MASK
                end = host + cluster
                if extended_l2:
                    # qemu reads only the allocated subclusters (bits 0-31 of the entry's bitmap),
                    # and writes a last cluster only up to its last allocated subcluster.
                    end = host + cluster // 32 * (words[i + 1] & 0xFFFFFFFF).bit_length()
            if host and end > img.size:
                raise refuse(f"is truncated: it maps data at offset {host} that runs beyond the end of the "
                             f"file ({img.size} bytes)", "download it again; check its checksum")


def inspect_qcow2(img: ImageFile) -> DetectedImage:
    """Vet a whole qcow2 file.  Raises UnsafeImage or UnsupportedFormat."""
    version, cluster_bits, size, l1_size, l1_off = check_header(img)
    extended_l2 = False
    if version == 3:
        extended_l2 = bool(img.unpack(">Q", 72)[0] & INCOMPAT_EXTL2)
    check_clusters(img, cluster_bits, size, l1_size, l1_off, extended_l2)
    return DetectedImage(DiskFormat.QCOW2, size, f"qcow2 v{version}")
