"""The export stream: a compact, self-describing copy of one disk.

Layout, all integers little-endian::

    header  24 bytes  magic b"\\x89CIDISK\\n", u16 version (1), u16 flags, u32 reserved (0),
                      u64 disk size in bytes
    body              the records below; when flag bit 0 is set, compressed as zstd frames
      DATA            b"DATA", u64 offset, u32 length, then `length` bytes of the disk
      END             b"END\\0", u64 disk size, u64 data bytes, u64 DATA records, then the
                      SHA-256 of every uncompressed byte before the digest (header included)

DATA records come in ascending, non-overlapping order; whatever they do not cover is zero.  The
exporter finds data with SEEK_DATA/SEEK_HOLE (holes of sparse files cost nothing to read) and
drops 4 KiB blocks of zeros, so a 10 GiB disk holding 1 GiB sends about 1 GiB.  The magic's
first byte has the high bit set and it ends in a newline, so mangling in transit shows.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from instance_cloudimage.runtime.errors import ConversionError

MAGIC = b"\x89CIDISK\n"
VERSION = 1
FLAG_ZSTD = 1
KNOWN_FLAGS = FLAG_ZSTD
HEADER = struct.Struct("<8sHHIQ")
DATA = struct.Struct("<4sQI")
END = struct.Struct("<4sQQQ")
DATA_TAG = b"DATA"
END_TAG = b"END\0"
DIGEST_SIZE = 32

BLOCK = 4096  # zero detection granularity: a filesystem block
CHUNK = 4 * 1024 * 1024  # read size, and the largest record the exporter writes
MAX_RECORD = 64 * 1024 * 1024  # largest record the importer accepts (bounds its memory)
ZERO_CHUNK = bytes(CHUNK)
ZERO_BLOCK = bytes(BLOCK)


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> Any: ...


# --- finding data -------------------------------------------------------------------------------

def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the regions that may hold data; holes of a sparse file are skipped.

    Block devices (and filesystems without SEEK_DATA) report everything as data.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here on
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size - pos
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def nonzero_runs(buf: bytearray, n: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs of BLOCKs in ``buf[:n]`` that are not all zero."""
    # bytes/bytearray comparison is a memcmp; memoryview comparison is not, so slice the bytearray.
    if n == CHUNK and buf == ZERO_CHUNK:
        return
    run_start = -1
    for i in range(0, n, BLOCK):
        j = min(i + BLOCK, n)
        zero = buf[i:j] == (ZERO_BLOCK if j - i == BLOCK else bytes(j - i))
        if not zero and run_start < 0:
            run_start = i
        elif zero and run_start >= 0:
            yield run_start, i
            run_start = -1
    if run_start >= 0:
        yield run_start, n


def read_full(fd: int, buf: bytearray, offset: int, length: int) -> int:
    view = memoryview(buf)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:length]], offset + got)
        if n == 0:
            break
        got += n
    return got


def estimate_stream_size(fd: int, size: int) -> int:
    """What the uncompressed stream will about cost: the allocated extents plus framing.

    Cheap (no data is read).  For a block device this is the disk size, as every byte may be data.
    """
    total = HEADER.size + END.size + DIGEST_SIZE
    for _, length in data_extents(fd, size):
        total += length + DATA.size * (-(-length // CHUNK))
    return total


# --- writing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamStats:
    disk_size: int
    data_bytes: int
    records: int
    stream_bytes: int  # what went to the sink (compressed when compressing)


class _Out:
    """Hashes the uncompressed bytes and counts what reaches the sink."""

    def __init__(self, sink: Sink, zstd_level: int | None) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.sent = 0
        self.cobj: Any = None
        if zstd_level is not None:
            import zstandard

            self.cobj = zstandard.ZstdCompressor(level=zstd_level, threads=-1).compressobj()

    def raw(self, data: bytes | memoryview) -> None:
        self.sink.write(data)
        self.sent += len(data)

    def body(self, data: bytes | memoryview, hashed: bool = True) -> None:
        if hashed:
            self.hash.update(data)
        if self.cobj is None:
            self.raw(data)
            return
        out = self.cobj.compress(data)
        if out:
            self.raw(out)

    def finish(self) -> None:
        if self.cobj is not None:
            self.raw(self.cobj.flush())


def write_stream(fd: int, size: int, sink: Sink, *, zstd_level: int | None = None,
                 progress: Callable[[int], None] | None = None) -> StreamStats:
    """Write the stream of the disk open at ``fd`` (``size`` bytes) to ``sink``."""
    out = _Out(sink, zstd_level)
    header = HEADER.pack(MAGIC, VERSION, FLAG_ZSTD if zstd_level is not None else 0, 0, size)
    out.hash.update(header)
    out.raw(header)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    data_bytes = records = 0
    scanned = 0
    for start, length in data_extents(fd, size):
        if progress and start > scanned:
            progress(start - scanned)  # a hole: nothing to read
        pos, end = start, start + length
        while pos < end:
            n = read_full(fd, buf, pos, min(CHUNK, end - pos))
            if n == 0:
                raise ConversionError(f"the disk ended at byte {pos}, before its size of {size} bytes")
            for a, b in nonzero_runs(buf, n):
                out.body(DATA.pack(DATA_TAG, pos + a, b - a))
                out.body(view[a:b])
                data_bytes += b - a
                records += 1
            if hasattr(os, "posix_fadvise"):  # do not flood the node's page cache with the disk
                os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)
            pos += n
            if progress:
                progress(n)
        scanned = end
    if progress and size > scanned:
        progress(size - scanned)
    out.body(END.pack(END_TAG, size, data_bytes, records))
    out.body(out.hash.digest(), hashed=False)
    out.finish()
    return StreamStats(size, data_bytes, records, out.sent)


# --- reading ------------------------------------------------------------------------------------

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
        while z.in_frame:  # the rest of the frame holding the end record
            if not z.step():
                raise StreamError("the import stream is truncated (it ended inside its last zstd frame)",
                                  "the export or the transfer was interrupted; export again")
            if z.pending():
                raise StreamError("the import stream has data after its end record")
        while True:  # whatever follows: complete frames that decompress to nothing
            head = z.peek_raw(4)
            if not head:
                return
            if head != ZSTD_MAGIC:
                kind = "a skippable zstd frame" if _skippable(head) else "bytes that are no zstd frame"
                raise StreamError(f"the import stream has data after its end record ({kind})")
            while True:
                if not z.step():
                    raise StreamError("the import stream has data after its end record "
                                      "(an incomplete zstd frame)")
                if z.pending():
                    raise StreamError("the import stream has data after its end record")
                if not z.in_frame:
                    break


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
