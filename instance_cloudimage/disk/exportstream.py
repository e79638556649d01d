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

This module holds the format and the writer; disk/importstream.py reads it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

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
