"""More of the hostile corpus (test_hostile.py has the first part): inputs that cost the host
unbounded work, and damaged images that a tool would otherwise convert "successfully" with
zeros in place of the missing data.  Each image is built here with qemu-img and struct.
"""

from __future__ import annotations

import io
import os
import signal
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from instance_cloudimage.image.detect import inspect_file
from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.runtime.errors import ConversionError, UnsafeImage
from tests.image.test_hostile import DISK, refused
from tests.support.imagetools import MiB, compare, deploy, make_raw_disk, new_disk, qemu_convert, run, sh

pytestmark = pytest.mark.integration
OFFSET_MASK = 0x00FFFFFFFFFFFE00


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-more")


class CountingImage(ImageFile):
    """An ImageFile that counts the bytes an inspector reads."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.bytes_read = 0

    def read_at(self, offset: int, length: int) -> bytes:
        self.bytes_read += length
        return super().read_at(offset, length)


def inspect_counting(path: Path) -> tuple[int, int]:
    """(virtual size, bytes read) of our inspector on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        img = CountingImage(fd)
        return inspect_file(img).virtual_size, img.bytes_read
    finally:
        os.close(fd)


def qcow2_l1_l2(data: bytes | bytearray) -> tuple[int, int, int, int]:
    """(cluster_bits, l1 size, l1 offset, the first L2 table's offset) of a qcow2 file."""
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    return cluster_bits, l1_size, l1_off, struct.unpack_from(">Q", data, l1_off)[0] & OFFSET_MASK


def test_qcow2_whose_l1_entries_all_name_one_l2_table(work: Path, tmp_path: Path) -> None:
    """qemu accepts an L1 table larger than the virtual size needs; 4096 entries naming the same
    L2 table made our inspector read 4096 clusters (with 2 MiB clusters and 2^20 entries, a 21 MB
    file cost an hour of CPU).  Each table is now read once, so the work is bounded by the file."""
    src = work / "l1.raw"
    src.write_bytes(os.urandom(MiB))
    image = qemu_convert(src, work / "l1-base.qcow2", "qcow2")
    data = bytearray(image.read_bytes())
    cluster_bits, _size, l1_off, _l2 = qcow2_l1_l2(data)
    cluster = 1 << cluster_bits
    new_l1 = -(-len(data) // cluster) * cluster
    entries = 4096
    data += bytes(new_l1 - len(data)) + data[l1_off:l1_off + 8] * entries
    struct.pack_into(">IQ", data, 36, entries, new_l1)
    bomb = work / "l1-bomb.qcow2"
    bomb.write_bytes(bytes(data))
    size, read = inspect_counting(bomb)
    assert size == MiB
    assert read < 2 * len(data), f"read {read} bytes of a {len(data)}-byte file"
    disk = new_disk(tmp_path / "disk", MiB)
    deploy(bomb, disk, local=True)  # a legitimate image all the same: qemu reads it
    compare(disk, src)


def last_compressed_cluster(data: bytes) -> int:
    """Host offset of the compressed cluster stored last in a qcow2 file."""
    cluster_bits, l1_size, l1_off, _l2 = qcow2_l1_l2(data)
    offset_bits = 62 - (cluster_bits - 8)
    last = 0
    for l1_entry in struct.unpack_from(f">{l1_size}Q", data, l1_off):
        l2 = l1_entry & OFFSET_MASK
        if l2:
            for entry in struct.unpack_from(f">{(1 << cluster_bits) // 8}Q", data, l2):
                if entry & (1 << 62):
                    last = max(last, entry & ((1 << offset_bits) - 1))
    assert last, "the image has compressed clusters"
    return last


def test_compressed_qcow2_cut_inside_its_last_cluster(work: Path, tmp_path: Path) -> None:
    """Cut one byte into its last compressed cluster, a compressed qcow2 passed our inspector and
    qemu-img info, then qemu-img convert failed half-way with "Input/output error"."""
    src = make_raw_disk(work / "c.raw", 16 * MiB)
    full = work / "c.qcow2"
    if not full.exists():
        sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src, full)
    data = full.read_bytes()
    cut = work / "c-cut.qcow2"
    cut.write_bytes(data[:last_compressed_cluster(data) + 1])
    refused(cut, tmp_path, UnsafeImage, "qcow2 image is truncated", local=True)
    disk = new_disk(tmp_path / "whole", 16 * MiB)
    deploy(full, disk, local=True)
    compare(disk, src)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_truncated_vmdk(subformat: str, work: Path, tmp_path: Path) -> None:
    """qemu reads a grain beyond the end of a VMDK as zeros: a monolithicSparse cut to 60% was
    written "successfully" with its last 40% zeroed, a streamOptimized one failed half-way
    through qemu-img convert with "Invalid argument"."""
    src = make_raw_disk(work / "v.raw", 16 * MiB)
    full = qemu_convert(src, work / f"{subformat}.vmdk", "vmdk", "-o", f"subformat={subformat}")
    data = full.read_bytes()
    cut = work / f"{subformat}-cut.vmdk"
    cut.write_bytes(data[:len(data) * 6 // 10])
    refused(cut, tmp_path, UnsafeImage, "is truncated", local=True)
    disk = new_disk(tmp_path / "whole", 16 * MiB)
    deploy(full, disk, local=True)
    compare(disk, src)


@contextmanager
def cpu_budget(seconds: int) -> Iterator[None]:
    """Fail the test once this process has used ``seconds`` more CPU time: a resource bound for
    inputs that used to cost minutes or hours, not a speed target (the margin is 100x)."""
    def expired(_signum: int, _frame: object) -> None:
        raise AssertionError(f"more than {seconds} s of CPU time")

    previous = signal.signal(signal.SIGPROF, expired)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def test_tar_with_a_huge_pax_sparse_map(work: Path, tmp_path: Path) -> None:
    """A PAX 1.0 sparse map announcing 2^20 entries, then 32 MiB of digits without a newline
    (32 KB gzipped): re-splitting the text after each 512-byte block took ~15 minutes."""
    body = b"1048576\n" + b"0" * (32 * MiB + 512)
    info = tarfile.TarInfo("disk.raw")
    info.size = len(body)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(MiB),
                        "GNU.sparse.name": "disk.raw"}
    image = work / "sparse-map.tar.gz"
    with tarfile.open(image, "w:gz", format=tarfile.PAX_FORMAT, compresslevel=1) as tf:
        tf.addfile(info, io.BytesIO(body))
    with cpu_budget(30):
        refused(image, tmp_path, UnsafeImage, "oversized sparse map")


def with_creator(vhd: bytes, creator: bytes, current: int) -> bytes:
    """A VHD with its footer (and the dynamic disk's copy at offset 0) naming another creator
    application and current size, checksums recomputed."""
    data = bytearray(vhd)
    for offset in ((0, len(data) - 512) if data[:8] == b"conectix" else (len(data) - 512,)):
        footer = data[offset:offset + 512]
        footer[28:32] = creator
        struct.pack_into(">QQ", footer, 40, current, current)  # original and current size
        footer[64:68] = bytes(4)
        struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
        data[offset:offset + 512] = footer
    return bytes(data)


@pytest.mark.parametrize("creator", [b"vbox", b"vs  ", b"win "])
def test_dynamic_vhd_sized_as_qemu_sizes_it(creator: bytes, work: Path, tmp_path: Path) -> None:
    """qemu takes the size of a VHD from its CHS geometry unless the creator is one it knows to
    write the current size (Hyper-V's "win ", "qem2", "d2v ", "CTXS", "tap\\0").  We used the
    current size for every creator but "vpc " and "qemu", so a VirtualBox VHD whose current
    size is not a whole geometry was refused: "qemu-img and our inspector disagree"."""
    src = make_raw_disk(work / "vhd.raw", 20 * MiB)
    image = work / f"{creator.decode().strip()}.vhd"
    image.write_bytes(with_creator(qemu_convert(src, work / "d.vhd", "vpc").read_bytes(), creator, 20 * MiB))
    expected = work / f"{creator.decode().strip()}-qemu.raw"
    sh("qemu-img", "convert", "-f", "vpc", "-O", "raw", image, expected)
    disk = new_disk(tmp_path / "disk", 21 * MiB)
    done = deploy(image, disk, local=True)
    assert done.detected.virtual_size == expected.stat().st_size
    compare(disk, expected)


def test_fixed_vhd_is_as_large_as_its_data(work: Path, tmp_path: Path) -> None:
    """A fixed VHD's data is copied as raw bytes, so it fits a disk of the data's size whatever
    its geometry says (20994048 bytes for a 20 MiB VirtualBox disk)."""
    src = make_raw_disk(work / "vhd.raw", 20 * MiB)
    image = work / "vbox-fixed.vhd"
    fixed = qemu_convert(src, work / "f.vhd", "vpc", "-o", "subformat=fixed").read_bytes()
    image.write_bytes(with_creator(src.read_bytes() + fixed[-512:], b"vbox", 20 * MiB))
    for local in (True, False):
        disk = new_disk(tmp_path / "disk", 20 * MiB)
        assert deploy(image, disk, local=local).detected.virtual_size == 20 * MiB
        compare(disk, src)


def ustar_header(name: bytes, size_field: bytes) -> bytes:
    """A ustar header with a size field written verbatim (checksum computed)."""
    header = bytearray(512)
    header[:len(name)] = name
    header[100:124] = b"0000644\0" + b"0000000\0" * 2
    header[124:136] = size_field
    header[136:148] = b"00000000000\0"
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@pytest.mark.parametrize("size_field", [b"-0000000001\0", b"0o0000001\0\0\0", b"00000_00001\0"])
def test_tar_size_fields_that_tar_refuses(size_field: bytes, work: Path, tmp_path: Path) -> None:
    """Python's int(text, 8) takes a sign, a 0o prefix and underscores; GNU tar refuses such an
    archive ("does not look like a tar archive").  A member of size -1 made us read the next
    header as part of it, and the disk member was written anyway."""
    payload = os.urandom(MiB)
    image = tmp_path / "numbers.tar"
    image.write_bytes(ustar_header(b"readme.txt", size_field) + ustar_header(b"disk.raw", b"%011o\0" % len(payload))
                      + payload + bytes(1024))
    refused(image, tmp_path, UnsafeImage, "malformed header")


# --- damaged and hostile .xz: xz refuses each, and so must a create ----------------------------

def xz_blocks(path: Path) -> list[tuple[int, int, int, int]]:
    """(offset, total size, unpadded size, uncompressed size) of each block, from xz --list."""
    listing = sh("xz", "--robot", "--list", "-vv", path).decode().splitlines()
    rows = [line.split("\t") for line in listing if line.startswith("block\t")]
    check_size = {"CRC64": 8, "CRC32": 4, "SHA-256": 32, "None": 0}
    return [(int(r[4]), int(r[6]), int(r[11]) + int(r[13]) + check_size[r[9]], int(r[7])) for r in rows]


def vli(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def with_index(data: bytes, records: list[tuple[int, int]]) -> bytes:
    """``data`` (one stream) with its index and footer replaced by ones listing ``records``
    as (unpadded size, uncompressed size), CRC32s correct."""
    index_start = len(data) - 12 - (int.from_bytes(data[-8:-4], "little") + 1) * 4
    index = bytearray(b"\0" + vli(len(records)))
    for unpadded, uncompressed in records:
        index += vli(unpadded) + vli(uncompressed)
    index += bytes(-len(index) % 4)
    index += struct.pack("<I", zlib.crc32(index))
    backward = struct.pack("<I", len(index) // 4 - 1) + data[6:8]
    return data[:index_start] + bytes(index) + struct.pack("<I", zlib.crc32(backward)) + backward + b"YZ"


def with_check_type(data: bytes, check: int) -> bytes:
    """``data`` (one stream) with another check type in its header and footer, CRC32s correct."""
    flags = bytes([0, check])
    backward = data[-8:-4] + flags
    return (data[:6] + flags + struct.pack("<I", zlib.crc32(flags)) + data[12:-12]
            + struct.pack("<I", zlib.crc32(backward)) + backward + b"YZ")


@pytest.fixture(scope="module")
def xz_image(work: Path) -> Path:
    """A 32 MiB disk in a multi-block xz (16 blocks of 2 MiB), as xz -T makes them."""
    image = work / "disk.raw.xz"
    image.write_bytes(sh("xz", "-c", "-T2", "-0", "--block-size=2MiB", make_raw_disk(work / "xz.raw")))
    return image


def flip(data: bytes, at: int) -> bytes:
    at %= len(data)
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1:]


def corrupt_block_3(path: Path, data: bytes) -> bytes:
    offset, size, _, _ = xz_blocks(path)[2]
    return flip(data, offset + size // 2)


def index_disagreeing(path: Path, data: bytes) -> bytes:
    records = [(unpadded, size) for _, _, unpadded, size in xz_blocks(path)]
    records[1] = (records[1][0], records[1][1] + 1)
    return with_index(data, records)


def unverifiable(path: Path, data: bytes) -> bytes:
    """Check type 2 is reserved, with a CRC32's four bytes: xz decodes it without verifying."""
    return with_check_type(sh("xz", "-c", "-T2", "-0", "--block-size=2MiB", "--check=crc32",
                              input=sh("xz", "-dc", path)), 2)


def two_streams(path: Path) -> bytes:
    """The same disk as two streams: the first half multi-block, the second half in one block
    without recorded sizes, as xz -T1 makes it."""
    raw = sh("xz", "-dc", path)
    half = len(raw) // 2
    return (sh("xz", "-c", "-T2", "-0", "--block-size=2MiB", input=raw[:half])
            + sh("xz", "-c", "-T1", "-0", "--check=crc32", input=raw[half:]))


CORRUPT, CUT = "Compressed data is corrupt", "Unexpected end of input"
XZ_SPOILED: dict[str, tuple[Callable[[Path, bytes], bytes], str]] = {
    "corrupt byte in block 3": (corrupt_block_3, CORRUPT),
    "cut inside a block": (lambda p, d: d[:len(d) // 2], CUT),
    "cut inside the footer": (lambda p, d: d[:-5], CUT),
    "index disagrees with block 2": (index_disagreeing, CORRUPT),
    "index lists a block too many": (lambda p, d: with_index(d, [b[2:] for b in xz_blocks(p)] + [(100, 100)]),
                                     CORRUPT),
    "corrupt footer": (lambda p, d: flip(d, -8), CORRUPT),
    "garbage after the last stream": (lambda p, d: d + b"garbage! garbage!", CORRUPT),
    "stream padding then garbage": (lambda p, d: d + b"\0\0\0\0garbage!", CUT),
    "padding not a multiple of four": (lambda p, d: d + bytes(3), CORRUPT),
    "a later stream truncated": (lambda p, d: two_streams(p)[:-20], CUT),
    "a later stream corrupt": (lambda p, d: flip(two_streams(p), -30), CORRUPT),
    "a check type xz cannot verify": (unverifiable, "Unsupported type of integrity check"),
}


@pytest.mark.parametrize("name", XZ_SPOILED)
def test_damaged_xz_is_refused_with_one_line(name: str, xz_image: Path, tmp_path: Path) -> None:
    """Each is refused by xz -t as well; the disk is scrubbed, so no partial image can boot."""
    spoil, reason = XZ_SPOILED[name]
    image = tmp_path / "bad.xz"
    image.write_bytes(spoil(xz_image, xz_image.read_bytes()))
    assert run(["xz", "-t", str(image)], capture_output=True).returncode != 0
    refused(image, tmp_path, ConversionError, rf"^the xz-compressed image could not be decompressed: \S*xz: "
                                              rf"\(stdin\): {reason}")
    with open(tmp_path / "disk", "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_xz_with_an_oversized_dictionary_is_refused(tmp_path: Path) -> None:
    """A 1.5 GiB LZMA2 dictionary (the largest xz makes) in a small file: xz runs under the
    decoders' 1 GiB address-space limit, so it cannot allocate it.  The header is edited in a
    file made with a small one (decoding with a larger dictionary than the encoder's is valid)."""
    data = bytearray(sh("xz", "-c", "-T1", "-0", input=bytes(MiB)))
    header = data[12:24]  # the block header: size, flags, LZMA2 filter id, property size, dictionary
    assert header[:4] == b"\x02\x00\x21\x01"
    header[4] = 37  # 1.5 GiB
    header[8:12] = struct.pack("<I", zlib.crc32(header[:8]))
    data[12:24] = header
    image = tmp_path / "dictionary.xz"
    image.write_bytes(bytes(data))
    refused(image, tmp_path, ConversionError, r"could not be decompressed: \S*xz: \(stdin\): Cannot allocate memory")


def tar_with(entries: bytes, disk_image: Path) -> bytes:
    """A GNU tar: ``entries`` (raw 512-byte blocks), then ``disk_image`` as disk.raw, then the end."""
    data = disk_image.read_bytes()
    member = tarfile.TarInfo("disk.raw")
    member.size = len(data)
    return entries + member.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512) + bytes(1024)


def small_raw(work: Path) -> Path:
    path = work / "small.raw"
    return path if path.exists() else make_raw_disk(path, 16 * MiB)


def empty_dirs(count: int) -> bytes:
    entry = tarfile.TarInfo("d/")
    entry.type = tarfile.DIRTYPE
    return entry.tobuf(format=tarfile.GNU_FORMAT) * count


def zstd_file(path: Path, data: bytes) -> Path:
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return path


def test_tar_of_many_empty_entries_is_refused_quickly(work: Path, tmp_path: Path) -> None:
    """200,000 empty directory entries before the disk member: 100 MB of headers in ~100 KB of
    zstd.  They were not counted, and parsing them uncapped cost 34 s of CPU for 90 KB."""
    raw = small_raw(work)
    headers = zstd_file(work / "headers.zst", empty_dirs(200_000))
    assert headers.stat().st_size < 200_000
    image = zstd_file(work / "many-entries.tar.zst", tar_with(empty_dirs(200_000), raw))
    with cpu_budget(5):
        refused(image, tmp_path, UnsafeImage, "more than 10000 entries besides the disk image")


def test_tar_with_entries_below_the_cap_is_written(work: Path, tmp_path: Path) -> None:
    raw = small_raw(work)
    image = zstd_file(work / "some-entries.tar.zst", tar_with(empty_dirs(9_000), raw))
    disk = new_disk(tmp_path / "disk", DISK)
    deploy(image, disk)
    compare(raw, disk)


def test_tar_with_a_pax_header_of_many_records_is_refused(work: Path, tmp_path: Path) -> None:
    record = b"12 comment=\n"  # a PAX record names its own length: 12 bytes
    assert len(record) == 12
    body = record * 2000
    pax = tarfile.TarInfo("./PaxHeaders/x")
    pax.type = tarfile.XHDTYPE
    pax.size = len(body)
    entries = pax.tobuf(format=tarfile.GNU_FORMAT) + body + bytes(-len(body) % 512)
    image = zstd_file(work / "pax-records.tar.zst", tar_with(entries, small_raw(work)))
    refused(image, tmp_path, UnsafeImage, "PAX header with too many records")


def test_tar_cost_is_linear_within_the_caps(work: Path, tmp_path: Path) -> None:
    """The most parsing the caps allow: 255 PAX headers of 1 MiB, each at the record cap, then
    9,000 empty entries; within the CPU budget docs/images.md states (a few seconds)."""
    value = b"v" * 1000
    record = b"%d comment=%s\n" % (len(value) + 14, value)
    assert len(record) == len(value) + 14
    body = record * 1000
    pax = tarfile.TarInfo("./PaxHeaders/x")
    pax.type = tarfile.XHDTYPE
    pax.size = len(body)
    # Each PAX header applies to the next member, so pair each with an empty directory.
    one = pax.tobuf(format=tarfile.GNU_FORMAT) + body + bytes(-len(body) % 512) + empty_dirs(1)
    raw = small_raw(work)
    image = zstd_file(work / "pax-heavy.tar.zst", tar_with(one * 255 + empty_dirs(9_000), raw))
    disk = new_disk(tmp_path / "disk", DISK)
    with cpu_budget(10):
        deploy(image, disk)
    compare(raw, disk)
