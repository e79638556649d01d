"""The .xz container parser against files made by the real xz, and against broken variants."""

from __future__ import annotations

import hashlib
import io
import lzma
import struct
import zlib
from pathlib import Path

import pytest

from instance_cloudimage.xzformat import (
    HEADER_SIZE,
    BlockHeader,
    ByteReader,
    Truncated,
    XzFormatError,
    build_index,
    check_footer,
    check_index,
    encode_vli,
    parse_block_header,
    parse_stream_header,
    read_block_header,
    read_index,
    read_vli,
    synthetic_tail,
)
from tests.support.imagetools import MiB, sh


class Source:
    """A Readable over bytes, at most ``step`` bytes per call."""

    def __init__(self, data: bytes, step: int = 7000) -> None:
        self.data = io.BytesIO(data)
        self.step = step

    def readinto(self, buf: bytearray | memoryview) -> int:
        return self.data.readinto(memoryview(buf)[:self.step])

    def read(self, n: int = -1) -> bytes:
        return self.data.read(min(n, self.step))


@pytest.fixture(scope="module")
def payload() -> bytes:
    """Random (incompressible) then repetitive data: blocks of very different compressed sizes."""
    return hashlib.shake_256(b"xz").digest(MiB + 12345) + b"compressible line\n" * 200_000


@pytest.fixture(scope="module")
def multi(payload: bytes, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("xz") / "p"
    path.write_bytes(payload)
    return sh("xz", "-T2", "-3", "--block-size=1MiB", "-c", path)


def walk(data: bytes) -> tuple[int, list[BlockHeader], ByteReader]:
    """Parse a one-stream .xz up to its index indicator."""
    reader = ByteReader(Source(data))
    check = parse_stream_header(reader.read_exact(HEADER_SIZE))
    blocks = []
    while (block := read_block_header(reader)) is not None:
        blocks.append(block)
        reader.read_exact(block.span(check))
    return check, blocks, reader


def listed_blocks(data: bytes, tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "l.xz"
    path.write_bytes(data)
    lines = sh("xz", "--robot", "--list", "-vv", path).decode().splitlines()
    return [line.split("\t") for line in lines if line.startswith("block")]


def test_block_headers_give_what_xz_lists(multi: bytes, payload: bytes, tmp_path: Path) -> None:
    check, blocks, _ = walk(multi)
    assert check == 4  # CRC64, xz's default
    listed = listed_blocks(multi, tmp_path)
    assert len(blocks) == len(listed) == -(-len(payload) // MiB) > 2
    for block, row in zip(blocks, listed, strict=True):
        # xz --robot: ... total size, uncompressed size, ..., header size, flags, compressed size
        assert block.uncompressed == int(row[7])
        assert block.compressed == int(row[13])
        assert len(block.raw) == int(row[11])
        assert len(block.raw) + block.span(check) == int(row[6])
        assert block.dict_size == 4 * MiB  # -3
    assert sum(b.uncompressed or 0 for b in blocks) == len(payload)


@pytest.mark.parametrize("per_stream", [1, 2])
def test_blocks_make_valid_streams_of_their_own(per_stream: int, multi: bytes, payload: bytes) -> None:
    """The synthetic streams of one or two blocks decode, with liblzma's checks, to the right slices."""
    header = multi[:HEADER_SIZE]
    check, blocks, _ = walk(multi)
    pos, out = HEADER_SIZE, b""
    for first in range(0, len(blocks), per_stream):
        group = blocks[first:first + per_stream]
        end = pos + sum(len(b.raw) + b.span(check) for b in group)
        tail = synthetic_tail(header, [(b.unpadded(check), b.uncompressed or 0) for b in group])
        out += lzma.decompress(header + multi[pos:end] + tail)
        pos = end
    assert out == payload


def test_the_real_index_matches_the_blocks(multi: bytes) -> None:
    check, blocks, reader = walk(multi)
    seen = [(b.unpadded(check), b.uncompressed or 0) for b in blocks]
    index_size = read_index(reader.read_exact, seen)
    check_footer(reader.read_exact(HEADER_SIZE), multi[:HEADER_SIZE], index_size)
    assert reader.read_upto(1) == b""
    assert build_index(seen) == multi[-HEADER_SIZE - index_size:-HEADER_SIZE]  # the same encoding as xz


def test_index_mismatches_are_refused() -> None:
    seen = [(1000, 4096), (2000, 8192)]
    good = build_index(seen)
    check_index(good, seen)
    with pytest.raises(XzFormatError, match="lists 1 blocks but the stream has 2"):
        check_index(build_index(seen[:1]), seen)
    with pytest.raises(XzFormatError, match="does not match block 2"):
        check_index(build_index([(1000, 4096), (2000, 8193)]), seen)
    with pytest.raises(XzFormatError, match="CRC32"):
        check_index(good[:-1] + bytes([good[-1] ^ 1]), seen)
    padded = good[:-4] + b"\0\0\0\0"
    with pytest.raises(XzFormatError, match="wrong length"):
        check_index(padded + struct.pack("<I", zlib.crc32(padded)), seen)
    with pytest.raises(XzFormatError, match="lists 1000 blocks"):  # refused before reading 1000 records
        read_index(Source(encode_vli(1000) + bytes(100)).read, seen)


def test_footer_checks() -> None:
    header = b"\xfd7zXZ\x00\x00\x04" + struct.pack("<I", zlib.crc32(b"\x00\x04"))
    backward = struct.pack("<I", 3) + b"\x00\x04"
    footer = struct.pack("<I", zlib.crc32(backward)) + backward + b"YZ"
    check_footer(footer, header, 16)
    with pytest.raises(XzFormatError, match="wrong index size"):
        check_footer(footer, header, 20)
    other = b"\xfd7zXZ\x00\x00\x01" + struct.pack("<I", zlib.crc32(b"\x00\x01"))
    with pytest.raises(XzFormatError, match="flags differ"):
        check_footer(footer, other, 16)
    with pytest.raises(XzFormatError, match="CRC32"):
        check_footer(footer[:4] + struct.pack("<I", 4) + footer[8:], header, 16)
    with pytest.raises(XzFormatError, match="magic"):
        check_footer(footer[:10] + b"ZY", header, 16)


def test_stream_header_checks() -> None:
    good = b"\xfd7zXZ\x00\x00\x0a" + struct.pack("<I", zlib.crc32(b"\x00\x0a"))
    assert parse_stream_header(good) == 10
    with pytest.raises(XzFormatError, match="CRC32"):
        parse_stream_header(good[:7] + b"\x04" + good[8:])
    bad_flags = b"\x00\x1a"
    with pytest.raises(XzFormatError, match="unsupported flags"):
        parse_stream_header(good[:6] + bad_flags + struct.pack("<I", zlib.crc32(bad_flags)))
    with pytest.raises(XzFormatError, match="magic"):
        parse_stream_header(b"\xfd7zXY\x00" + good[6:])


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_block_header_checks(multi: bytes) -> None:
    _, blocks, _ = walk(multi)
    raw = blocks[0].raw
    assert parse_block_header(raw) == blocks[0]
    with pytest.raises(XzFormatError, match="CRC32"):
        parse_block_header(raw[:3] + bytes([raw[3] ^ 1]) + raw[4:])
    with pytest.raises(XzFormatError, match="unsupported flags"):
        parse_block_header(with_crc(raw[:1] + bytes([raw[1] | 0x04]) + raw[2:-4]))
    with pytest.raises(XzFormatError, match="non-zero padding"):
        parse_block_header(with_crc(raw[:-5] + b"\x01"))
    no_sizes = parse_block_header(with_crc(b"\x02\x00\x21\x01\x16\x00\x00\x00"))  # what xz -T1 writes
    assert no_sizes.compressed is None and no_sizes.uncompressed is None and no_sizes.dict_size == 8 * MiB
    with pytest.raises(XzFormatError, match="compressed size of zero"):
        parse_block_header(with_crc(b"\x02\x40\x00\x21\x01\x16\x00\x00"))
    bcj = parse_block_header(with_crc(b"\x02\x01\x04\x00\x21\x01\x16\x00"))
    assert bcj.filters == ((4, b""), (0x21, b"\x16")) and bcj.dict_size == 8 * MiB


@pytest.mark.parametrize("encoded,value", [(b"\x00", 0), (b"\x7f", 127), (b"\x80\x01", 128),
                                           (b"\xff" * 8 + b"\x7f", 2**63 - 1)])
def test_vli_round_trip(encoded: bytes, value: int) -> None:
    assert read_vli(encoded, 0) == (value, len(encoded))
    assert encode_vli(value) == encoded


@pytest.mark.parametrize("encoded,match", [(b"\x80\x00", "not minimally"), (b"\x80" * 9 + b"\x01", "nine bytes"),
                                           (b"\x80", "cut short")])
def test_vli_refusals(encoded: bytes, match: str) -> None:
    with pytest.raises(XzFormatError, match=match):
        read_vli(encoded, 0)


def test_byte_reader() -> None:
    data = b"abc" + bytes(100_003) + b"tail" + b"x" * 200_000
    reader = ByteReader(Source(data))
    assert reader.read_exact(3) == b"abc"
    assert reader.skip_zeros() == 100_003
    assert reader.read_exact(4) == b"tail"
    got = b""
    while len(got) < 150_000:
        got += reader.read_some(150_000 - len(got))
    assert got == b"x" * 150_000
    rest = reader.replay(b"parsed")
    assert rest.read(6) == b"parsed"
    assert b"".join(iter(lambda: rest.read(65536), b"")) == b"x" * 50_000
    with pytest.raises(Truncated):
        ByteReader(Source(b"ab")).read_exact(3)
    with pytest.raises(Truncated):
        ByteReader(Source(b"")).read_some(10)
