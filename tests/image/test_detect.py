"""Format detection on crafted headers: every signature, polyglots, and the qcow2 safety bits.
(Real images made by qemu-img are in test_formats_integration.py and test_hostile.py.)"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from instance_cloudimage.image.detect import check_tail, identify, inspect_file
from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DiskFormat
from instance_cloudimage.image.vhd import crc32c, vhd_footer
from instance_cloudimage.image.vmdk import looks_like_descriptor, parse_descriptor
from instance_cloudimage.runtime.errors import UnsafeImage, UnsupportedFormat

HEAD = 128 * 1024


def pad(data: bytes, size: int = HEAD) -> bytes:
    return data + bytes(size - len(data))


def put(buf: bytearray, offset: int, data: bytes) -> bytearray:
    buf[offset:offset + len(data)] = data
    return buf


def mbr() -> bytearray:
    buf = bytearray(HEAD)
    put(buf, 446, bytes([0x80, 0, 0, 0, 0x83]) + bytes(11))
    return put(buf, 510, b"\x55\xaa")


def iso() -> bytearray:
    return put(bytearray(HEAD), 0x8001, b"CD001")


def qcow2_header(version: int = 3, backing: int = 0, crypt: int = 0, incompat: int = 0, cluster_bits: int = 16,
                 size: int = 1 << 20, l1_size: int = 1, l1_off: int = 3 << 16) -> bytes:
    head = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, backing, 0, cluster_bits, size, crypt, l1_size,
                       l1_off, 1 << 16, 1, 0, 0)
    if version == 3:
        head += struct.pack(">QQQII", incompat, 0, 0, 4, 104)
    return head


@pytest.mark.parametrize("head,fmt", [
    (pad(qcow2_header()), DiskFormat.QCOW2),
    (pad(qcow2_header(version=2)), DiskFormat.QCOW2),
    (pad(b"KDMV\x01"), DiskFormat.VMDK),
    (pad(b"conectix"), DiskFormat.VPC),
    (pad(b"vhdxfile"), DiskFormat.VHDX),
    (put(bytearray(HEAD), 0x40, struct.pack("<I", 0xBEDA107F)), DiskFormat.VDI),
    (mbr(), DiskFormat.RAW),
    (iso(), DiskFormat.RAW),
    (put(mbr(), 0x8001, b"CD001"), DiskFormat.RAW),  # a hybrid ISO is raw
    (put(bytearray(HEAD), 512, b"EFI PART"), DiskFormat.RAW),
    (os.urandom(HEAD), DiskFormat.RAW),
])
def test_identify(head: bytes, fmt: DiskFormat) -> None:
    assert identify(bytes(head)).format is fmt


@pytest.mark.parametrize("head,match", [
    (pad(qcow2_header(version=1)), r"qcow \(version 1\)"),
    (pad(qcow2_header(version=4)), "qcow2 version 4"),
    (pad(b"QED\0"), "QED"),
    (pad(b"COWD"), "ESX COWD"),
    (pad(b"LUKS\xba\xbe\x00\x02"), "LUKS"),
    (pad(b"WithouFreSpacExt"), "Parallels"),
    (pad(b"# Disk DescriptorFile\nversion=1\n"), "VMDK descriptor"),
    (pad(b"# comment\n\n  \nversion=1\r\n"), "VMDK descriptor"),
])
def test_refused_signatures(head: bytes, match: str) -> None:
    with pytest.raises(UnsupportedFormat, match=match):
        identify(head)


@pytest.mark.parametrize("head,names", [
    (bytes(put(iso(), 0, qcow2_header())), "qcow2, ISO 9660"),
    (bytes(put(mbr(), 0, b"KDMV")), "vmdk, MBR"),
    (bytes(put(put(bytearray(HEAD), 0, b"conectix"), 0x40, struct.pack("<I", 0xBEDA107F))), "vhd, vdi"),
    (bytes(put(iso(), 0, b"QED\0")), "QED, ISO 9660"),
])
def test_polyglots_are_refused(head: bytes, names: str) -> None:
    with pytest.raises(UnsafeImage, match=f"several formats \\({names}\\)"):
        identify(head)


def test_text_and_empty_images_are_refused() -> None:
    with pytest.raises(UnsafeImage, match="is text, not a disk image"):
        identify(b"<!DOCTYPE html><html>Not Found</html>\n" * 100)
    with pytest.raises(UnsafeImage, match="empty"):
        identify(b"")


def test_mbr_with_garbage_partition_entries_is_just_raw() -> None:
    head = put(bytearray(os.urandom(HEAD)), 510, b"\x55\xaa")
    put(head, 446, b"\x42")
    assert identify(bytes(head)).details == "raw"


def test_vmdk_descriptor_probe_matches_qemu() -> None:
    assert looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n")
    assert not looks_like_descriptor(b"#!/bin/sh\nexec something\n")
    assert not looks_like_descriptor(b"\x00" * 512)


@pytest.mark.parametrize("text,match", [
    ('createType="monolithicFlat"\nRW 2048 FLAT "x-flat.vmdk" 0\n', "create type monolithicFlat"),
    ('createType="streamOptimized"\nparentCID=1234abcd\nRW 2048 SPARSE "x.vmdk"\n', "parent disk"),
    ('createType="streamOptimized"\nparentFileNameHint="/etc/passwd"\n', "parent disk"),
    ('createType="monolithicSparse"\nrm -rf /\n', "not understood"),
])
def test_vmdk_descriptor_refusals(text: str, match: str) -> None:
    with pytest.raises((UnsafeImage, UnsupportedFormat), match=match):
        parse_descriptor(text)


def test_vmdk_descriptor_as_qemu_writes_it() -> None:
    text = ('# Disk DescriptorFile\nversion=1\nCID=7d2f8733\nparentCID=ffffffff\ncreateType="streamOptimized"\n\n'
            '# Extent description\nRW 2048 SPARSE "x.vmdk"\n\n#DDB\nddb.virtualHWVersion = "4"\n'
            'ddb.adapterType = "ide"\n')
    assert parse_descriptor(text) == ("streamOptimized", [("RW", 2048, "SPARSE", "x.vmdk")])


def write(tmp_path: Path, data: bytes) -> ImageFile:
    path = tmp_path / "img"
    path.write_bytes(data)
    return ImageFile(os.open(path, os.O_RDONLY))


@pytest.mark.parametrize("kwargs,match", [
    ({"backing": 0x1000}, "backing file"),
    ({"crypt": 2}, "encrypted"),
    ({"incompat": 1}, "dirty"),
    ({"incompat": 2}, "corrupt"),
    ({"incompat": 4}, "external data file"),
    ({"incompat": 1 << 20}, "unknown incompatible features"),
    ({"cluster_bits": 30}, "invalid cluster size"),
    ({"l1_size": 0}, "L1 table too small"),
])
def test_qcow2_header_refusals(kwargs: dict[str, int], match: str, tmp_path: Path) -> None:
    with pytest.raises((UnsafeImage, UnsupportedFormat), match=match):
        inspect_file(write(tmp_path, pad(qcow2_header(**kwargs), 4 << 16)))


def test_qcow2_data_file_extension_and_truncation(tmp_path: Path) -> None:
    head = bytearray(pad(qcow2_header(), 4 << 16))
    put(head, 104, struct.pack(">II", 0x44415441, 8) + b"/etc/pwd")
    with pytest.raises(UnsafeImage, match="external data file"):
        inspect_file(write(tmp_path, bytes(head)))
    head = bytearray(pad(qcow2_header(), 4 << 16))
    put(head, 3 << 16, struct.pack(">Q", 4 << 16))  # L1 points at an L2 table past the end
    with pytest.raises(UnsafeImage, match="truncated"):
        inspect_file(write(tmp_path, bytes(head)))
    put(head, 3 << 16, struct.pack(">Q", 2 << 16))  # a valid L2 table mapping a cluster past the end
    put(head, 2 << 16, struct.pack(">Q", 9 << 16))
    with pytest.raises(UnsafeImage, match="maps data at offset 589824 that runs beyond the end"):
        inspect_file(write(tmp_path, bytes(head)))
    put(head, 2 << 16, struct.pack(">Q", 1 << 16))
    assert inspect_file(write(tmp_path, bytes(head))).virtual_size == 1 << 20


def vhd_footer_bytes(disk_type: int, size: int, creator: bytes = b"win ") -> bytes:
    data = bytearray(struct.pack(">8sIIQI4sI4sQQHBBII", b"conectix", 2, 0x10000, 0xFFFFFFFFFFFFFFFF, 0, creator,
                                 0, b"Wi2k", size, size, 1000, 16, 63, disk_type, 0))
    data += bytes(512 - len(data))
    checksum = ~(sum(data[:64]) + sum(data[68:])) & 0xFFFFFFFF
    data[64:68] = struct.pack(">I", checksum)
    return bytes(data)


def test_fixed_vhd_and_dmg_trailers() -> None:
    footer = vhd_footer_bytes(2, 1 << 20)
    assert check_tail(footer, (1 << 20) + 512) == 1 << 20
    assert check_tail(footer, (1 << 20) + 1024) is None, "the footer must follow exactly its data"
    assert vhd_footer(footer[:100] + b"x" + footer[101:]) is None, "a bad checksum is no footer"
    assert vhd_footer(vhd_footer_bytes(2, 1 << 20, b"qemu")) == (2, 1000 * 16 * 63 * 512), "qemu's CHS rule"
    with pytest.raises(UnsupportedFormat, match="DMG"):
        check_tail(b"koly" + bytes(508), 1 << 20)


def test_differencing_vhd_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeImage, match="differencing"):
        inspect_file(write(tmp_path, pad(vhd_footer_bytes(4, 1 << 20), 4096)))


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283
