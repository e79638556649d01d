"""Inspectors for VHD (qemu's "vpc", dynamic and fixed), VHDX and VDI.

None of these can name a host file the way qcow2 and VMDK can, but each has a differencing
variant with a parent, which is refused, and each has tables that must lie inside the file.
Virtual sizes are computed exactly as qemu does, so that qemu-img info can confirm them.
"""

from __future__ import annotations

import struct
import uuid

from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DetectedImage, DiskFormat
from instance_cloudimage.runtime.errors import UnsafeImage, UnsupportedFormat

# --- VHD -------------------------------------------------------------------------------------
VHD_COOKIE = b"conectix"
VHD_FOOTER_FMT = ">8sIIQI4sI4sQQHBBII"
VHD_FIXED, VHD_DYNAMIC, VHD_DIFFERENCING = 2, 3, 4
VHD_MAX_CHS_SECTORS = 65535 * 16 * 255
VHD_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def vhd_footer(data: bytes) -> tuple[int, int] | None:
    """(disk type, virtual size) of a valid VHD footer, else None."""
    if len(data) < 512 or data[:8] != VHD_COOKIE:
        return None
    (_cookie, _features, _version, _data_off, _time, creator, _cver, _cos, _orig, current, cyls, heads,
     secs, disk_type, checksum) = struct.unpack_from(VHD_FOOTER_FMT, data)
    if (~(sum(data[:64]) + sum(data[68:512]))) & 0xFFFFFFFF != checksum:
        return None
    chs = cyls * heads * secs
    # qemu (block/vpc.c) reads the current size only from the creators it knows to write it
    # (Hyper-V, newer qemu, Disk2vhd, XenConverter, XenServer) or with a maximal geometry; any
    # other creator (Virtual PC, old qemu, VirtualBox...) by its CHS geometry.
    if creator in VHD_SIZE_CREATORS or chs == VHD_MAX_CHS_SECTORS:
        return disk_type, current - current % 512
    return disk_type, chs * 512


def fixed_vhd_data_size(tail: bytes, total: int) -> int | None:
    """If ``tail`` (the last 512 bytes of ``total``) is a fixed VHD footer, the data's length."""
    footer = vhd_footer(tail)
    if footer is None or footer[0] != VHD_FIXED:
        return None
    current = struct.unpack_from(">Q", tail, 48)[0]
    return current if current == total - 512 else None


def inspect_vhd(img: ImageFile) -> DetectedImage:
    """A dynamic VHD (a copy of the footer at offset 0) or a fixed one (footer only at the end)."""
    head = img.read_upto(0, 512)
    if head[:8] != VHD_COOKIE:
        tail = img.read_at(img.size - 512, 512)
        data_size = fixed_vhd_data_size(tail, img.size)
        if data_size is None:
            raise UnsafeImage("VHD image has an invalid footer")
        # Its data is copied as raw bytes, whatever size qemu would derive from the geometry
        # (as a streamed fixed VHD, deploy.raw_result).
        return DetectedImage(DiskFormat.VPC, data_size, "vhd (fixed)", raw_data_size=data_size)
    footer = vhd_footer(head)
    if footer is None:
        raise UnsafeImage("VHD image has an invalid footer (checksum mismatch)")
    disk_type, size = footer
    if disk_type == VHD_DIFFERENCING:
        raise UnsafeImage("VHD image is a differencing disk with a parent, which could read host files",
                          "merge it first")
    if disk_type != VHD_DYNAMIC:
        raise UnsupportedFormat(f"VHD disk type {disk_type} is not supported")
    dyn_off = struct.unpack_from(">Q", head, 16)[0]
    cookie, _data, bat_off, _ver, entries, block_size = img.unpack(">8sQQIII", dyn_off)
    if cookie != b"cxsparse":
        raise UnsafeImage("VHD image has an invalid dynamic header")
    if block_size < 512 or block_size & (block_size - 1) or block_size > 1 << 28:
        raise UnsafeImage("VHD image has an invalid block size")
    if entries * block_size < size:
        raise UnsafeImage("VHD image has a block table too small for its size")
    bitmap = -(-block_size // (512 * 8 * 512)) * 512
    for sector in img.read_array(bat_off, entries, ">I"):
        if sector != 0xFFFFFFFF and sector * 512 + bitmap + block_size > img.size:
            raise UnsafeImage(f"VHD image is truncated: a block lies beyond the end of the file "
                              f"({img.size} bytes)", "download it again; check its checksum")
    return DetectedImage(DiskFormat.VPC, size, "vhd (dynamic)")


# --- VHDX ------------------------------------------------------------------------------------
VHDX_BAT = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08").bytes_le
VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
VHDX_FILE_PARAMS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
VHDX_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le
VHDX_PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").bytes_le
VHDX_MAX_ENTRIES = 2047


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksum_ok(block: bytes) -> bool:
    stored: int = struct.unpack_from("<I", block, 4)[0]
    return crc32c(block[:4] + b"\0\0\0\0" + block[8:]) == stored


def vhdx_current_header(img: ImageFile) -> bytes:
    best: tuple[int, bytes] | None = None
    for offset in (64 * 1024, 128 * 1024):
        block = img.read_at(offset, 4096)
        if block[:4] == b"head" and checksum_ok(block):
            seq = struct.unpack_from("<Q", block, 8)[0]
            if best is None or seq > best[0]:
                best = (seq, block)
    if best is None:
        raise UnsafeImage("VHDX image has no valid header")
    return best[1]


def vhdx_regions(img: ImageFile) -> dict[bytes, tuple[int, int]]:
    for offset in (192 * 1024, 256 * 1024):
        table = img.read_at(offset, 64 * 1024)
        if table[:4] == b"regi" and checksum_ok(table):
            count = struct.unpack_from("<I", table, 8)[0]
            if count > VHDX_MAX_ENTRIES:
                break
            regions = {}
            for i in range(count):
                guid, off, length, required = struct.unpack_from("<16sQII", table, 16 + 32 * i)
                if guid not in (VHDX_BAT, VHDX_METADATA) and required & 1:
                    raise UnsupportedFormat("VHDX image requires a region we do not know")
                if length:
                    img.read_at(off + length - 1, 1)  # the region lies inside the file
                regions[guid] = (off, length)
            if VHDX_BAT in regions and VHDX_METADATA in regions:
                return regions
            break
    raise UnsafeImage("VHDX image has no valid region table")


def inspect_vhdx(img: ImageFile) -> DetectedImage:
    if img.read_at(0, 8) != b"vhdxfile":
        raise UnsafeImage("VHDX image has no VHDX signature")
    header = vhdx_current_header(img)
    if header[48:64] != bytes(16):
        raise UnsafeImage("VHDX image has a log that must be replayed (it was not closed cleanly)",
                          "open it once in Hyper-V or qemu read-write to replay the log")
    meta_off, _meta_len = vhdx_regions(img)[VHDX_METADATA]
    sig, _res, count = img.unpack("<8sHH", meta_off)
    if sig != b"metadata" or count > VHDX_MAX_ENTRIES:
        raise UnsafeImage("VHDX image has an invalid metadata table")
    table = img.read_at(meta_off + 32, 32 * count)
    items = {}
    for i in range(count):
        guid, off, length, _flags = struct.unpack_from("<16sIII", table, 32 * i)
        items[guid] = (meta_off + off, length)
    if VHDX_PARENT_LOCATOR in items:
        raise UnsafeImage("VHDX image is a differencing disk with a parent, which could read host files")
    if VHDX_FILE_PARAMS not in items or VHDX_DISK_SIZE not in items:
        raise UnsafeImage("VHDX image lacks required metadata")
    _block_size, params = img.unpack("<II", items[VHDX_FILE_PARAMS][0])
    if params & 2:
        raise UnsafeImage("VHDX image has a parent, which could read host files")
    size = img.unpack("<Q", items[VHDX_DISK_SIZE][0])[0]
    return DetectedImage(DiskFormat.VHDX, size, "vhdx")


# --- VDI -------------------------------------------------------------------------------------
VDI_MAGIC = 0xBEDA107F
VDI_DYNAMIC, VDI_STATIC = 1, 2


def inspect_vdi(img: ImageFile) -> DetectedImage:
    (magic, version, _hsize, image_type, _flags) = img.unpack("<IIIII", 0x40)
    if magic != VDI_MAGIC:
        raise UnsafeImage("VDI image has no VDI signature")
    if version != 0x00010001:
        raise UnsupportedFormat(f"VDI version {version >> 16}.{version & 0xFFFF} is not supported")
    if image_type not in (VDI_DYNAMIC, VDI_STATIC):
        raise UnsafeImage("VDI image is a differencing or undo disk with a parent",
                          "merge it first in VirtualBox")
    (bmap_off, data_off, _c, _h, _s, sector_size, _unused, size, block_size, block_extra, blocks,
     allocated) = img.unpack("<IIIIIIIQIIII", 0x154)
    if sector_size != 512 or block_size != 1 << 20 or block_extra != 0:
        raise UnsupportedFormat("VDI image has a block layout qemu does not read")
    if blocks * block_size < size or bmap_off + 4 * blocks > data_off or allocated > blocks:
        raise UnsafeImage("VDI image has an invalid block map")
    if data_off + allocated * block_size > img.size:
        raise UnsafeImage(f"VDI image is truncated: {allocated} blocks do not fit in the file "
                          f"({img.size} bytes)", "download it again; check its checksum")
    return DetectedImage(DiskFormat.VDI, size, "vdi (static)" if image_type == VDI_STATIC else "vdi")
