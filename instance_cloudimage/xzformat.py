"""The .xz container (https://tukaani.org/xz/xz-file-format.txt): headers, index and footer.

Reading, parsing and building only, no decoding: xzparallel.py uses it to find the blocks of a
stream while it streams, to wrap each block in a one-block stream of its own for liblzma, and to
check what liblzma no longer sees once the blocks are split apart (the real index against the
blocks, the footer, the padding between streams).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from instance_cloudimage.image.wrappers import Readable

MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
HEADER_SIZE = 12  # stream header and stream footer
FILTER_LZMA2 = 0x21
# Check type -> size of the check field (§2.1.1.2); liblzma verifies only these ids.
CHECK_SIZES = (0, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64)
VERIFIED_CHECKS = {0: "none", 1: "CRC32", 4: "CRC64", 10: "SHA-256"}
READ_AHEAD = 64 * 1024  # what a ByteReader reads at once for headers, index and padding


class XzFormatError(ValueError):
    """The bytes break the .xz format; the message says how (one line, no data)."""


class Truncated(XzFormatError):
    pass


@dataclass(frozen=True)
class BlockHeader:
    raw: bytes  # the whole header, CRC32 included
    compressed: int | None  # Compressed Size, when the encoder wrote it
    uncompressed: int | None
    filters: tuple[tuple[int, bytes], ...]  # (filter id, properties), in chain order

    @property
    def dict_size(self) -> int | None:
        """The LZMA2 dictionary size (what decoding it costs in memory), None without LZMA2."""
        for fid, props in self.filters:
            if fid == FILTER_LZMA2 and len(props) == 1 and props[0] <= 40:
                bits = props[0]
                return 0xFFFFFFFF if bits == 40 else (2 | (bits & 1)) << (bits // 2 + 11)
        return None

    def span(self, check: int) -> int:
        """Bytes after the header: compressed data, block padding and the check field."""
        assert self.compressed is not None
        return self.compressed + (-self.compressed % 4) + CHECK_SIZES[check]

    def unpadded(self, check: int) -> int:
        """The Unpadded Size the index records for this block (§4.3.2)."""
        assert self.compressed is not None
        return len(self.raw) + self.compressed + CHECK_SIZES[check]


def read_vli(data: bytes | bytearray, pos: int) -> tuple[int, int]:
    """A variable-length integer at ``pos``: (value, position after it).  Non-minimal encodings
    and more than nine bytes are refused, as liblzma does."""
    value = 0
    for i in range(9):
        if pos >= len(data):
            raise XzFormatError("a size field is cut short")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i:
                raise XzFormatError("a size field is not minimally encoded")
            return value, pos
    raise XzFormatError("a size field is longer than nine bytes")


def encode_vli(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def crc32(data: bytes | bytearray) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def parse_stream_header(header: bytes) -> int:
    """The check type of a 12-byte stream header; raises XzFormatError if it is not one."""
    if header[:6] != MAGIC:
        raise XzFormatError("a stream does not start with the xz magic bytes")
    flags = header[6:8]
    if crc32(flags) != header[8:12]:
        raise XzFormatError("a stream header is corrupt (CRC32 mismatch)")
    if flags[0] or flags[1] & 0xF0:
        raise XzFormatError("a stream header has unsupported flags")
    return flags[1]


def parse_block_header(raw: bytes) -> BlockHeader:
    """A whole block header (its size is ``(raw[0] + 1) * 4``), CRC32 checked."""
    if len(raw) != (raw[0] + 1) * 4 or raw[0] == 0:
        raise XzFormatError("a block header has the wrong length")
    if crc32(raw[:-4]) != raw[-4:]:
        raise XzFormatError("a block header is corrupt (CRC32 mismatch)")
    flags = raw[1]
    if flags & 0x3C:
        raise XzFormatError("a block header has unsupported flags")
    body = raw[:-4]
    pos = 2
    compressed = uncompressed = None
    if flags & 0x40:
        compressed, pos = read_vli(body, pos)
        if compressed == 0:
            raise XzFormatError("a block header gives a compressed size of zero")
    if flags & 0x80:
        uncompressed, pos = read_vli(body, pos)
    filters = []
    for _ in range((flags & 3) + 1):
        fid, pos = read_vli(body, pos)
        size, pos = read_vli(body, pos)
        if pos + size > len(body):
            raise XzFormatError("a block header's filter properties are cut short")
        filters.append((fid, bytes(body[pos:pos + size])))
        pos += size
    if any(body[pos:]):
        raise XzFormatError("a block header has non-zero padding")
    return BlockHeader(bytes(raw), compressed, uncompressed, tuple(filters))


def build_index(records: list[tuple[int, int]]) -> bytes:
    """An index (§4) listing ``(unpadded size, uncompressed size)`` per block, CRC32 included."""
    index = bytearray(b"\0" + encode_vli(len(records)))
    for unpadded, uncompressed in records:
        index += encode_vli(unpadded) + encode_vli(uncompressed)
    index += bytes(-len(index) % 4)
    return bytes(index + crc32(index))


def build_footer(flags: bytes, index_size: int) -> bytes:
    backward = struct.pack("<I", index_size // 4 - 1) + flags
    return crc32(backward) + backward + FOOTER_MAGIC


def synthetic_tail(stream_header: bytes, records: list[tuple[int, int]]) -> bytes:
    """What follows some blocks to make them a complete stream of their own: index and footer."""
    index = build_index(records)
    return index + build_footer(stream_header[6:8], len(index))


def check_index(index: bytes, blocks: list[tuple[int, int]]) -> None:
    """The real index of a stream (indicator byte to CRC32) against the blocks that were seen."""
    try:
        count, pos = read_vli(index, 1)
        if count != len(blocks):
            raise XzFormatError(f"its index lists {count} blocks but the stream has {len(blocks)}")
        for number, seen in enumerate(blocks, 1):
            unpadded, pos = read_vli(index, pos)
            uncompressed, pos = read_vli(index, pos)
            if (unpadded, uncompressed) != seen:
                raise XzFormatError(f"its index does not match block {number}")
    except XzFormatError as e:
        raise XzFormatError(f"the index is corrupt: {e}") from None
    if pos + (-pos % 4) + 4 != len(index) or any(index[pos:-4]):
        raise XzFormatError("the index has the wrong length or non-zero padding")
    if crc32(index[:-4]) != index[-4:]:
        raise XzFormatError("the index is corrupt (CRC32 mismatch)")


def read_index(read: Callable[[int], bytes], blocks: list[tuple[int, int]]) -> int:
    """Read a stream's index after its indicator byte with ``read(n)`` (exactly n bytes), check
    it against the blocks seen, and return its size."""
    raw = bytearray(1)

    def vli() -> int:
        start = len(raw)
        for _ in range(9):
            raw.extend(read(1))
            if not raw[-1] & 0x80:
                return read_vli(raw, start)[0]
        raise XzFormatError("the index is corrupt: a size field is longer than nine bytes")

    if vli() != len(blocks):  # checked before reading the records a hostile count announces
        check_index(bytes(raw), blocks)
    for _ in blocks:
        vli()
        vli()
    raw.extend(read(-len(raw) % 4 + 4))
    check_index(bytes(raw), blocks)
    return len(raw)


def check_footer(footer: bytes, stream_header: bytes, index_size: int) -> None:
    if footer[10:12] != FOOTER_MAGIC:
        raise XzFormatError("a stream footer is missing its magic bytes")
    if crc32(footer[4:10]) != footer[0:4]:
        raise XzFormatError("a stream footer is corrupt (CRC32 mismatch)")
    if footer[8:10] != stream_header[6:8]:
        raise XzFormatError("a stream footer's flags differ from its header's")
    if (struct.unpack("<I", footer[4:8])[0] + 1) * 4 != index_size:
        raise XzFormatError("a stream footer gives the wrong index size")


# --- reading a stream ------------------------------------------------------------------

class Prefixed:
    """Bytes already read, then the rest of the source."""

    def __init__(self, prefix: bytes, source: Readable) -> None:
        self.prefix = memoryview(prefix)
        self.source = source

    def readinto(self, buf: bytearray | memoryview) -> int:
        if self.prefix:
            n = min(len(buf), len(self.prefix))
            memoryview(buf)[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        return self.source.readinto(buf)

    def read(self, n: int = READ_AHEAD) -> bytes:
        buf = bytearray(n)
        return bytes(buf[:self.readinto(buf)])


class ByteReader:
    """The splitter's view of the source: exact reads, with a little read-ahead for headers."""

    def __init__(self, source: Readable) -> None:
        self.source = source
        self.buf = b""
        self.pos = 0

    def _more(self, n: int) -> bool:
        chunk = bytearray(max(n, READ_AHEAD))
        got = self.source.readinto(chunk)
        self.buf = self.buf[self.pos:] + bytes(chunk[:got])
        self.pos = 0
        return got > 0

    def read_upto(self, n: int) -> bytes:
        while len(self.buf) - self.pos < n and self._more(n):
            pass
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def read_exact(self, n: int) -> bytes:
        out = self.read_upto(n)
        if len(out) < n:
            raise Truncated("truncated")
        return out

    def read_some(self, n: int) -> bytes | bytearray:
        """Up to ``n`` (> 0) bytes of a block's body; large reads go straight to a new buffer."""
        if self.pos < len(self.buf):
            out = self.buf[self.pos:self.pos + n]
            self.pos += len(out)
            return out
        chunk = bytearray(n)
        view = memoryview(chunk)
        got = 0
        while got < n and (k := self.source.readinto(view[got:])):
            got += k
        if not got:
            raise Truncated("truncated")
        del view
        del chunk[got:]
        return chunk

    def skip_zeros(self) -> int:
        """Skip zero bytes (stream padding); return how many."""
        skipped = 0
        while self.pos < len(self.buf) or self._more(READ_AHEAD):
            rest = self.buf[self.pos:]
            zeros = len(rest) - len(rest.lstrip(b"\0"))
            skipped += zeros
            self.pos += zeros
            if zeros < len(rest):
                break
        return skipped

    def unread(self, data: bytes) -> None:
        """Put back bytes read past the end of a stream."""
        self.buf = data + self.buf[self.pos:]
        self.pos = 0

    def replay(self, consumed: bytes) -> Prefixed:
        """A Readable of ``consumed`` (already parsed), the read-ahead, then the source."""
        return Prefixed(consumed + self.buf[self.pos:], self.source)


def read_block_header(reader: ByteReader) -> BlockHeader | None:
    """The next block header, or None at the index indicator."""
    first = reader.read_exact(1)
    if first == b"\0":
        return None
    return parse_block_header(first + reader.read_exact(first[0] * 4 + 3))
