"""Reading the export stream (its layout: disk/exportstream.py), as the import script does.

Every record is checked against the header and the disk before it is used, the body's SHA-256
against the END record, and nothing but empty zstd frames may follow END.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from instance_cloudimage.disk.exportstream import (
    CHUNK,
    DATA,
    DATA_TAG,
    DIGEST_SIZE,
    END,
    END_TAG,
    FLAG_ZSTD,
    HEADER,
    KNOWN_FLAGS,
    MAGIC,
    MAX_RECORD,
    VERSION,
)
from instance_cloudimage.runtime.errors import ConversionError


class StreamError(ConversionError):
    """The import stream is truncated, corrupt or does not fit."""


def looks_damaged(head: bytes) -> bool:
    """Nearly our magic: a stream of ours whose first bytes were mangled (not a raw disk)."""
    return len(head) >= len(MAGIC) and sum(a == b for a, b in zip(head, MAGIC, strict=False)) >= 6


@dataclass(frozen=True)
class Header:
    version: int
    flags: int
    disk_size: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)


def parse_header(data: bytes) -> Header:
    if len(data) != HEADER.size:
        raise StreamError("the import stream is truncated (it ended inside its header)")
    magic, version, flags, _reserved, disk_size = HEADER.unpack(data)
    if magic != MAGIC:
        raise StreamError("the import stream's header is damaged", "export the disk again")
    if version != VERSION:
        raise StreamError(f"the import stream has format version {version}; this provider reads version "
                          f"{VERSION}", "update instance-cloudimage on this node")
    if flags & ~KNOWN_FLAGS:
        raise StreamError(f"the import stream uses unknown features (flags {flags:#x})",
                          "update instance-cloudimage on this node")
    return Header(version, flags, disk_size)


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_FEED = 1024  # compressed bytes per decompress call: at most ~32 MiB come out of 1 KiB
ZSTD_READ = 128 * 1024


def _skippable(head: bytes) -> bool:
    return len(head) == 4 and head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


class _Zstd:
    """zstd frames from a raw source, one frame at a time, output in bounded pieces.

    Unlike zstandard's stream reader, it knows where each frame ends and whether the source ended
    inside one, which the check after the end record needs.
    """

    def __init__(self, src: BinaryIO) -> None:
        import zstandard

        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressor of the frame being read; None between frames
        self._in = b""  # compressed bytes read from the source, not yet decompressed
        self._out = memoryview(b"")  # decompressed bytes not yet returned

    @property
    def in_frame(self) -> bool:
        return self._frame is not None

    def _more_input(self) -> bool:
        if not self._in:
            self._in = self._src.read(ZSTD_READ)
        return bool(self._in)

    def peek_raw(self, n: int) -> bytes:
        """Up to ``n`` undecompressed bytes at the current position (fewer at the end of the source)."""
        while len(self._in) < n:
            more = self._src.read(ZSTD_READ)
            if not more:
                break
            self._in += more
        return self._in[:n]

    def step(self) -> bool:
        """Decompress a little more into the output; False at the end of the source."""
        if not self._more_input():
            return False
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        feed, self._in = self._in[:ZSTD_FEED], self._in[ZSTD_FEED:]
        try:
            out = self._frame.decompress(feed)
        except Exception as e:  # zstandard.ZstdError: the compressed data is corrupt
            raise StreamError(f"the import stream's compressed data is corrupt ({e})") from None
        if self._frame.eof:
            self._in = self._frame.unused_data + self._in
            self._frame = None
        self._out = memoryview(out)
        return True

    def pending(self) -> int:
        return len(self._out)

    def read(self, n: int) -> bytes:
        while not self._out:
            if not self.step():
                return b""
        piece = bytes(self._out[:n])
        self._out = self._out[n:]
        return piece


class Reader:
    """Exact reads from the stream body, decompressing when needed.

    zstd input is fed in small pieces, so a stream that decompresses to far more than it says
    cannot exhaust memory.  After the end record only empty zstd frames (complete frames that
    decompress to nothing) may follow: a skippable frame, an incomplete frame or any other byte
    is data after the end record.
    """

    def __init__(self, src: BinaryIO, compressed: bool) -> None:
        self._src: Any = src
        self._zstd = _Zstd(src) if compressed else None
        if self._zstd is not None:
            self._src = self._zstd

    def _read(self, n: int) -> bytes:
        data: bytes = self._src.read(n)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        parts = []
        got = 0
        while got < n:
            piece = self._read(n - got)
            if not piece:
                raise StreamError(f"the import stream is truncated (it ended inside {what})",
                                  "the export or the transfer was interrupted; export again")
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)

    def check_end(self) -> None:
        """Read the source to its end: nothing may follow the end record but empty zstd frames."""
        z = self._zstd
        if z is None:
            if self._read(1):
                raise StreamError("the import stream has data after its end record")
            return
        if z.pending():
            raise StreamError("the import stream has data after its end record")
        if z.in_frame:  # the rest of the frame holding the end record
            _finish_frame(z, StreamError("the import stream is truncated (it ended inside its last zstd frame)",
                                         "the export or the transfer was interrupted; export again"))
        while head := z.peek_raw(4):  # whatever follows: complete frames that decompress to nothing
            if head != ZSTD_MAGIC:
                kind = "a skippable zstd frame" if _skippable(head) else "bytes that are no zstd frame"
                raise StreamError(f"the import stream has data after its end record ({kind})")
            _finish_frame(z, StreamError("the import stream has data after its end record (an incomplete zstd frame)"))


def _finish_frame(z: _Zstd, cut: StreamError) -> None:
    """Decompress to the end of the current (or next) frame, which must yield nothing; ``cut`` if it stops short."""
    while True:
        if not z.step():
            raise cut
        if z.pending():
            raise StreamError("the import stream has data after its end record")
        if not z.in_frame:
            return


def read_records(reader: Reader, header: Header, max_size: int,
                 on_data: Callable[[int, bytes], None]) -> int:
    """Verify and replay the records; ``on_data(offset, bytes)`` for each piece.  Returns data bytes.

    Raises StreamError for a truncated or corrupt stream; the disk may then hold part of the
    data, and the import fails.
    """
    if header.disk_size > max_size:
        raise StreamError(f"the import stream is of a {header.disk_size}-byte disk, larger than the "
                          f"target of {max_size} bytes", "import onto a disk at least as large")
    digest = hashlib.sha256(HEADER.pack(MAGIC, header.version, header.flags, 0, header.disk_size))
    pos = data_bytes = records = 0
    while True:
        tag = reader.read_exact(4, "a record")
        if tag == DATA_TAG:
            rest = reader.read_exact(DATA.size - 4, "a record header")
            digest.update(tag + rest)
            _, offset, length = DATA.unpack(tag + rest)
            if offset < pos or length == 0 or length > MAX_RECORD or offset + length > header.disk_size:
                raise StreamError(f"the import stream is corrupt (record {records} at offset {offset}, "
                                  f"length {length}, is out of order or out of the disk)")
            done = 0
            while done < length:
                piece = reader.read_exact(min(CHUNK, length - done), "a data record")
                digest.update(piece)
                on_data(offset + done, piece)
                done += len(piece)
            pos = offset + length
            data_bytes += length
            records += 1
        elif tag == END_TAG:
            rest = reader.read_exact(END.size - 4, "the end record")
            digest.update(tag + rest)
            _, size, want_data, want_records = END.unpack(tag + rest)
            got = reader.read_exact(DIGEST_SIZE, "the checksum")
            if (size, want_data, want_records) != (header.disk_size, data_bytes, records):
                raise StreamError("the import stream is corrupt (its end record does not match its content)")
            if got != digest.digest():
                raise StreamError("the import stream is corrupt (checksum mismatch)", "export the disk again")
            reader.check_end()
            return data_bytes
        else:
            raise StreamError(f"the import stream is corrupt (unknown record type after {records} records)")
