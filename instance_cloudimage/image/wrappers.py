"""Compression wrappers: detected by magic bytes, decoded while streaming, sizes announced.

Never by extension or Content-Type.  Each wrapper is decoded by the
fastest decoder measured on these machines (docs/performance.md): ``xz``/``pigz``/``lbzip2`` fed
through a pipe by a thread, and in-process ``zstandard`` (a pipe costs zstd more than it gains).
Python's stdlib decoders are the fallback when a tool is missing (slower, and ``lzma`` and ``bz2``
ignore data after the last stream).  Decoders run with an address-space limit; the decompressed
byte count is capped by the writer, and the sizes some formats announce only serve to refuse a
bomb before starting.
"""

from __future__ import annotations

import bz2
import fcntl
import gzip
import logging
import lzma
import os
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any, Protocol

from instance_cloudimage.image.formats import Wrapper
from instance_cloudimage.runtime.errors import (
    CloudImageError,
    CommandError,
    CommandNotFound,
    ConversionError,
    UnsupportedFormat,
)
from instance_cloudimage.runtime.process import Limits, Spawned, spawn

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024
# Decoders need little memory; a hostile header must not make them take the host's.
DECODER_LIMITS = Limits(address_space=1024**3)
DECODER_ENV = {"MALLOC_ARENA_MAX": "2"}
# Added per tool.  xz: a fixed mmap threshold returns each block buffer to the system when it is
# freed (glibc's dynamic one keeps a freed 24 MiB block in the heap, up to 20 MiB over the limit
# below), so xz's memory limit bounds its RSS.
TOOL_ENV = {"xz": {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}}

MAGICS: tuple[tuple[int, bytes, Wrapper], ...] = (
    (0, b"\x1f\x8b\x08", Wrapper.GZIP),
    (0, b"\xfd7zXZ\x00", Wrapper.XZ),
    (0, b"\x28\xb5\x2f\xfd", Wrapper.ZSTD),
)
UNSUPPORTED: tuple[tuple[bytes, str], ...] = (
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"PK\x03\x04", "zip"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip"),
    (b"LZIP", "lzip"),
    (b"\x1f\x9d", "compress (.Z)"),
    (b"Rar!\x1a\x07", "RAR"),
)
# xz -T0 decodes the blocks of a multi-block file (any xz -T made) in parallel, each held whole in
# and out: ~150 MiB for the 24 MiB blocks of xz -T0 -6.  --memlimit-mt-decompress only lowers the
# thread count (down to the single-threaded decoder, ~18 MiB), it never refuses a file; 80 MiB
# keeps a create of such an image, our process and xz together, under 128 MiB (measured: 125 MiB
# from HTTPS, 114 MiB from a local file), about 10% slower than unlimited.  The hard limit is
# DECODER_LIMITS' address space: a hostile 1.5 GiB dictionary fails to allocate there.
# Decoders per wrapper, fastest first: a tool's argv, or None for Python's stdlib module.
Decoder = tuple[str, ...] | None
DECODERS: dict[Wrapper, tuple[Decoder, ...]] = {
    # No stdlib fallback for xz: Python's lzma accepts garbage after the last stream and check
    # types it cannot verify, which xz refuses.  xz-utils is a required Debian package.
    Wrapper.XZ: (("xz", "--format=xz", "-T0", "--memlimit-mt-decompress=80MiB", "-dc"),),
    Wrapper.GZIP: (("pigz", "-dc"), None),
    Wrapper.BZIP2: (("lbzip2", "-dc"), None),
    Wrapper.ZSTD: (None,),
}


class Readable(Protocol):
    def readinto(self, buf: bytearray | memoryview) -> int: ...

    def read(self, n: int = ...) -> bytes: ...


class Layer:
    """One decoding layer over a Readable; ``finish`` checks it ended well, ``close`` cleans up."""

    what = "image"

    def readinto(self, buf: bytearray | memoryview) -> int:
        raise NotImplementedError

    def read(self, n: int = CHUNK) -> bytes:
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def finish(self) -> None:
        """Check that the layer ended well (all data consumed, decoder exited cleanly)."""
        drain(self, self.what)

    def close(self) -> None:
        pass


def drain(source: Readable, what: str, limit: int = 1024 * 1024) -> None:
    """Read to the end; more than ``limit`` bytes after the disk image is refused (a hidden payload)."""
    buf = bytearray(64 * 1024)
    total = 0
    while n := source.readinto(buf):
        total += n
        if total > limit:
            raise ConversionError(f"the {what} has more data after the disk image")


def is_tar(head: bytes) -> bool:
    if len(head) < 512 or head[257:262] != b"ustar":
        return False
    block = head[:512]
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


def identify_wrapper(head: bytes) -> Wrapper | None:
    """The wrapper whose magic starts ``head``, or None.  Raises UnsupportedFormat for others."""
    for offset, magic, wrapper in MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return wrapper
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] in (
            b"\x31\x41\x59\x26\x53\x59", b"\x17\x72\x45\x38\x50\x90"):
        return Wrapper.BZIP2
    if is_tar(head):
        return Wrapper.TAR
    for magic, name in UNSUPPORTED:
        if head.startswith(magic):
            raise UnsupportedFormat(f"{name} archives are not supported",
                                    "use gzip, xz, bzip2, zstd or tar")
    return None


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(9):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
    raise ValueError("varint too long")


def xz_announced_size(path: Path) -> int | None:
    """Uncompressed size from the index of the last xz stream (the total of that stream)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        for _ in range(1024):  # stream padding: groups of four zero bytes
            if end < 12 or os.pread(f.fileno(), 4, end - 4) != b"\0\0\0\0":
                break
            end -= 4
        footer = os.pread(f.fileno(), 12, max(end - 12, 0))
        if len(footer) != 12 or footer[10:12] != b"YZ":
            return None
        index_size = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
        if index_size > 16 * 1024 * 1024 or index_size > end - 12:
            return None
        index = os.pread(f.fileno(), index_size, end - 12 - index_size)
    try:
        if index[0] != 0:
            return None
        count, pos = read_varint(index, 1)
        total = 0
        for _ in range(count):
            _unpadded, pos = read_varint(index, pos)
            size, pos = read_varint(index, pos)
            total += size
        return total
    except (IndexError, ValueError):
        return None


def announced_size(wrapper: Wrapper, head: bytes, path: Path | None) -> int | None:
    """A lower bound of the decompressed size that the data announces, if any.

    Attacker-controlled, so only good for refusing early: the gzip ISIZE is the size modulo 2^32
    (the real size is at least that), the xz index and zstd frame header count one stream/frame.
    """
    try:
        if wrapper is Wrapper.ZSTD:
            import zstandard

            size = int(zstandard.frame_content_size(head))
            return size if size >= 0 else None
        if wrapper is Wrapper.GZIP and path is not None:
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                return int(struct.unpack("<I", f.read(4))[0])
        if wrapper is Wrapper.XZ and path is not None:
            return xz_announced_size(path)
    except Exception:  # an announced size is only a hint: never fail on a malformed one
        return None
    return None


class PipeDecoder(Layer):
    """An external decoder: a thread feeds it from the source, we read its output."""

    def __init__(self, argv: tuple[str, ...], source: Readable, what: str) -> None:
        self.what = what
        self.child: Spawned = spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    limits=DECODER_LIMITS, env=DECODER_ENV | TOOL_ENV.get(argv[0], {}))
        proc = self.child.proc
        assert proc.stdin is not None and proc.stdout is not None
        for pipe in (proc.stdin, proc.stdout):
            try:  # fewer, larger reads: a 64 KiB pipe costs 16x the syscalls
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
        self.out_fd = proc.stdout.fileno()
        self.source = source
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._feed, args=(proc.stdin,), name=f"feed-{argv[0]}",
                                       daemon=True)
        self.thread.start()

    def _feed(self, stdin: Any) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        fd = stdin.fileno()
        try:
            while n := self.source.readinto(buf):
                done = 0
                while done < n:
                    done += os.write(fd, view[done:n])
        except BrokenPipeError:
            pass  # the decoder stopped reading; its exit status says why
        except BaseException as e:  # re-raised in the reading thread
            self.error = e
        finally:
            stdin.close()

    def readinto(self, buf: bytearray | memoryview) -> int:
        n = os.readv(self.out_fd, [buf])
        if n == 0:
            self._check()
        return n

    def _check(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        try:
            self.child.wait_checked()
        except CommandError as e:
            raise ConversionError(f"the {self.what} could not be decompressed: {e.last_line}") from None

    def close(self) -> None:
        self.child.close()
        self.thread.join(timeout=10)


class ZstdFrames:
    """Walks the zstd frame and block headers of the compressed bytes as they are read.

    python-zstandard's stream_reader returns a truncated frame's data without any error; this
    walker knows whether the input ended on a frame boundary (zstd_compression_format.md).
    """

    def __init__(self, source: Readable, what: str) -> None:
        self.source = source
        self.what = what
        self.header = bytearray()
        self.want = 4  # header bytes still needed for the current step
        self.step = "magic"
        self.skip = 0
        self.checksum = False
        self.frames = 0

    def read(self, n: int = CHUNK) -> bytes:
        data = self.source.read(n)
        self.feed(data)
        return data

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self.skip:
                k = min(self.skip, len(data) - pos)
                self.skip -= k
                pos += k
                continue
            k = min(self.want - len(self.header), len(data) - pos)
            self.header += data[pos:pos + k]
            pos += k
            if len(self.header) == self.want:
                self.advance(bytes(self.header))

    def advance(self, h: bytes) -> None:
        self.header.clear()
        if self.step == "magic":
            magic = struct.unpack("<I", h)[0]
            if magic == 0xFD2FB528:
                self.step, self.want = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self.step, self.want = "skippable", 4
            else:
                raise ConversionError(f"the {self.what} has data that is not zstd after a frame")
        elif self.step == "skippable":
            self.step, self.want, self.skip = "magic", 4, struct.unpack("<I", h)[0]
        elif self.step == "descriptor":
            d = h[0]
            single = (d >> 5) & 1
            self.checksum = bool(d & 4)
            self.skip = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + (single, 2, 4, 8)[d >> 6]
            self.step, self.want = "block", 3
        elif self.step == "block":
            header = int.from_bytes(h, "little")
            kind, size = (header >> 1) & 3, header >> 3
            self.skip = 1 if kind == 1 else size
            if header & 1:  # the frame's last block
                self.skip += 4 if self.checksum else 0
                self.frames += 1
                self.step, self.want = "magic", 4

    def check_complete(self) -> None:
        if self.step != "magic" or self.header or self.skip or not self.frames:
            raise ConversionError(f"the {self.what} is truncated (it ends inside a zstd frame)",
                                  "download it again; check its checksum")


class FileDecoder(Layer):
    """An in-process decoder: zstandard, or a stdlib module when the tool is missing."""

    def __init__(self, wrapper: Wrapper, source: Readable, what: str) -> None:
        self.what = what
        self.reader: Any
        self.frames: ZstdFrames | None = None
        fileobj: Any = source  # the stdlib decoders only call read()
        if wrapper is Wrapper.ZSTD:
            import zstandard

            self.frames = ZstdFrames(source, what)
            tapped: Any = self.frames  # stream_reader only calls read()
            self.reader = zstandard.ZstdDecompressor().stream_reader(tapped, read_size=CHUNK,
                                                                     read_across_frames=True)
        elif wrapper is Wrapper.XZ:
            self.reader = lzma.LZMAFile(fileobj)
        elif wrapper is Wrapper.GZIP:
            self.reader = gzip.GzipFile(fileobj=fileobj)
        else:
            self.reader = bz2.BZ2File(fileobj)

    def readinto(self, buf: bytearray | memoryview) -> int:
        try:
            n = int(self.reader.readinto(buf))
            if n == 0 and self.frames is not None:
                self.frames.check_complete()
            return n
        except CloudImageError:
            raise  # from the source below us (a download error, a checksum mismatch)
        except Exception as e:  # zstandard.ZstdError, lzma.LZMAError, EOFError, gzip.BadGzipFile...
            raise ConversionError(f"the {self.what} could not be decompressed: {e}") from None


def open_decoder(wrapper: Wrapper, source: Readable, what: str) -> Layer:
    """A Layer yielding the decompressed bytes of ``source``, by the first decoder installed."""
    decoders = DECODERS[wrapper]
    for i, argv in enumerate(decoders):
        if argv is None:
            return FileDecoder(wrapper, source, what)
        try:
            return PipeDecoder(argv, source, what)
        except CommandNotFound:
            if i == len(decoders) - 1:
                raise
            log.info("%s not found; decompressing %s in-process (slower)", argv[0], wrapper.value)
    raise AssertionError("unreachable: DECODERS has a decoder for every wrapper")
