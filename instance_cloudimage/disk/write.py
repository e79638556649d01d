"""Writing a raw byte stream onto the instance's disk: a block device or a Ganeti file disk.

Zero handling follows what the disk really contains: all-zero chunks
are skipped only when the disk is known to read back zeros (a file disk with no data extents, or
a block device the operator says Ganeti wiped, on a first install); otherwise they are zeroed
with BLKZEROOUT or a punched hole, so a previous instance's data never survives in the image's
zero regions.  The byte count is capped at the disk's size while streaming, so a decompression
bomb stops at the first byte beyond it and a file disk never grows.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
from contextlib import ExitStack
from dataclasses import dataclass

from instance_cloudimage.disk.sparse import BLKZEROOUT, has_data, punch_hole, write_all
from instance_cloudimage.image.wrappers import Readable
from instance_cloudimage.runtime.errors import ConversionError, DiskTooSmall, EnvironmentError_
from instance_cloudimage.runtime.log import Progress, format_size

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
ZERO = bytes(CHUNK)
BLKGETSIZE64 = 0x80081272
# A fixed VHD is raw data plus a 512-byte footer that may end exactly at the disk's end.
TRAILER = 512
SCRUB = 1024 * 1024


@dataclass
class DiskTarget:
    """An open disk (or spool file).  ``known_zero``: every byte not written reads back zero."""

    path: str
    fd: int
    size: int
    is_block: bool
    known_zero: bool
    grows: bool = False  # a spool file: starts empty, its length is set at the end
    role: str = "the disk"
    extent: int = 0  # end of what was written so far, for scrub()


def too_large(needed: int, target: DiskTarget, *, at_least: bool = False) -> DiskTooSmall:
    size_text = f"{'at least ' if at_least else ''}{needed} bytes"
    return DiskTooSmall(f"image is larger than {target.role}: {size_text}, {target.role} holds "
                        f"{format_size(target.size)} ({target.size} bytes)",
                        "create the instance with a larger disk 0", needed=needed)


def open_disk(path: str, *, wiped: bool, stack: ExitStack) -> DiskTarget:
    """Open the instance's disk for writing; never creates or truncates it.

    ``wiped``: the site says Ganeti zeroed new block devices and this is a first install.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise EnvironmentError_(f"disk 0 cannot be opened for writing: {e.strerror}") from None
    stack.callback(os.close, fd)
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = int(struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0])
        return DiskTarget(path, fd, size, True, wiped)
    if stat.S_ISREG(st.st_mode):
        return DiskTarget(path, fd, st.st_size, False, not has_data(fd, 0, st.st_size))
    raise EnvironmentError_("disk 0 is neither a block device nor a regular file")


def zero_range(target: DiskTarget, offset: int, length: int) -> None:
    """Make [offset, offset+length) read back zeros, as cheaply as the disk allows."""
    if length <= 0:
        return
    try:
        if target.is_block and offset % 512 == 0 and length % 512 == 0:
            fcntl.ioctl(target.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        if not target.is_block and punch_hole(target.fd, offset, length):
            return
    except OSError as e:
        log.debug("fast zeroing failed (%s); writing zeros", e)
    while length > 0:
        n = min(length, CHUNK)
        write_all(target.fd, memoryview(ZERO)[:n], offset)
        offset += n
        length -= n


def fill(src: Readable, view: memoryview) -> int:
    """Read until ``view`` is full or the source ends."""
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])
        if not n:
            break
        got += n
    return got


@dataclass(frozen=True)
class CopyResult:
    size: int  # bytes that fit on the target (the image's length unless ``overflow``)
    written: int  # bytes written as data (zero chunks are skipped or zeroed)
    tail: bytes  # the last 512 bytes of the stream, for trailers (fixed VHD, DMG)
    overflow: int  # bytes beyond the target's end (at most TRAILER, then the stream ended)


class _Copier:
    def __init__(self, target: DiskTarget) -> None:
        self.target = target
        self.pos = 0
        self.written = 0
        self.zero_from: int | None = None

    def put(self, buf: bytearray, n: int) -> None:
        zero = buf == ZERO if n == CHUNK else buf[:n] == ZERO[:n]
        if zero:
            if not self.target.known_zero and self.zero_from is None:
                self.zero_from = self.pos
        else:
            self.flush_zeros()
            write_all(self.target.fd, memoryview(buf)[:n], self.pos)
            self.written += n
            self.target.extent = self.pos + n
        self.pos += n

    def flush_zeros(self) -> None:
        if self.zero_from is not None:
            zero_range(self.target, self.zero_from, self.pos - self.zero_from)
            self.zero_from = None


def copy_stream(src: Readable, target: DiskTarget, *, total: int | None = None) -> CopyResult:
    """Copy ``src`` onto ``target`` from offset 0, durably.  Raises DiskTooSmall past its end."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    copier = _Copier(target)
    tail = b""
    overflow = 0
    with Progress("writing image", total) as progress:
        while n := fill(src, view):
            fit = min(n, target.size - copier.pos)
            if fit < n:
                overflow = n - fit
                if overflow > TRAILER or fill(src, memoryview(bytearray(1))):
                    raise too_large(copier.pos + n, target, at_least=True)
            if fit:
                copier.put(buf, fit)
            tail = (tail + bytes(view[max(0, n - TRAILER):n]))[-TRAILER:]
            progress.update(n)
            if overflow:
                break
        copier.flush_zeros()
    if target.grows:
        os.ftruncate(target.fd, copier.pos)
    try:
        os.fsync(target.fd)
    except OSError as e:
        raise ConversionError(f"writing the image onto {target.path} failed: {e.strerror}") from None
    return CopyResult(copier.pos, copier.written, tail, overflow)


def scrub(target: DiskTarget) -> None:
    """After a failed write: zero the start and the end of what was written (partition tables and
    the backup GPT), so that a half-written or unverified image can never boot."""
    try:
        zero_range(target, 0, min(SCRUB, target.size))
        start = max(SCRUB, target.extent - SCRUB)
        zero_range(target, start, min(target.extent, target.size) - start)
        os.fsync(target.fd)
    except OSError as e:
        log.warning("could not scrub the partly written disk: %s", e.strerror)
