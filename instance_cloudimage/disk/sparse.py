"""Writing an imported disk: data at offsets, and zeros where the stream has none.

Gaps must read back as zeros whatever the device held before (a reused LV, a DRBD device).
They cost almost nothing where the kernel can help: a hole is punched into a regular file
(skipped where the file already has a hole there) and BLKZEROOUT lets a block device zero a range
itself (write-zeroes offload, or a punched hole behind a loop device).  Only when neither works
are zeros written.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from types import TracebackType

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SECTOR = 512
ZERO_WRITE = bytes(4 * 1024 * 1024)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a regular file (it then reads as zeros); False if unsupported."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite until all of ``data`` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


def has_data(fd: int, offset: int, length: int) -> bool:
    """Whether a regular file may hold data in the range (False: it is all hole)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError as e:
        if e.errno == errno.ENXIO:
            return False
        return True


class DiskWriter:
    """Writes a disk image onto a block device or regular file, in ascending order.

    ``write`` puts data at an offset, ``zero`` makes a range read as zeros; ``close`` flushes
    to stable storage.  A regular file that is one big hole when opened (a fresh sparse disk)
    is known to be zero and gaps then cost nothing at all.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not (self.is_block or stat.S_ISREG(st.st_mode)):
                raise OSError(errno.EINVAL, "not a block device or regular file")
            self.known_zero = not self.is_block and not has_data(self.fd, 0, st.st_size)
        except BaseException:
            os.close(self.fd)
            raise
        self._can_zeroout = True
        self._can_punch = True
        self.zeroed_by_writing = 0
        self.touched = False  # whether anything was written or zeroed: the device is no longer as it was

    def __enter__(self) -> DiskWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            os.close(self.fd)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.touched = True
        write_all(self.fd, data, offset)

    def _write_zeros(self, offset: int, length: int) -> None:
        self.zeroed_by_writing += length
        while length > 0:
            n = min(length, len(ZERO_WRITE))
            self.write(offset, memoryview(ZERO_WRITE)[:n])
            offset += n
            length -= n

    def _zeroout(self, offset: int, length: int) -> bool:
        """BLKZEROOUT on the sector-aligned middle of the range; the edges are written."""
        start = -(-offset // SECTOR) * SECTOR
        end = (offset + length) // SECTOR * SECTOR
        if end <= start:
            return False
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", start, end - start))
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                self._can_zeroout = False
                return False
            raise
        self._write_zeros(offset, start - offset)
        self._write_zeros(end, offset + length - end)
        return True

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros."""
        if length <= 0 or self.known_zero:
            return
        self.touched = True
        if self.is_block:
            if self._can_zeroout and self._zeroout(offset, length):
                return
        elif not has_data(self.fd, offset, length):
            return
        elif self._can_punch:
            if punch_hole(self.fd, offset, length):
                return
            self._can_punch = False
        self._write_zeros(offset, length)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


def blank_ends(path: str, length: int = 1024 * 1024) -> None:
    """Make the first and last ``length`` bytes of a disk read as zeros: its partition tables (the
    GPT's backup is at the end) and boot code, so that nothing boots from what is left."""
    with DiskWriter(path) as writer:
        size = os.lseek(writer.fd, 0, os.SEEK_END)
        head = min(length, size)
        writer.zero(0, head)
        tail = max(head, size - length)
        writer.zero(tail, size - tail)
