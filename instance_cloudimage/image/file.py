"""Bounded random reads of an image for the header inspectors.

An inspector reads a verified image file (``ImageFile``), which refuses reads beyond its end or
larger than MAX_READ, so a lying header cannot make an inspector read past the end of the file
or buffer more than it asked for.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

from instance_cloudimage.runtime.errors import UnsafeImage

# No inspector needs more than this in one read (a qcow2 L2 table is at most 2 MiB).
MAX_READ = 4 * 1024 * 1024
ARRAY_READ = 1024 * 1024  # bytes per read of a table of offsets


class ImageFile:
    """A whole image file, read with pread."""

    def __init__(self, fd: int, what: str = "image") -> None:
        self.fd = fd
        self.size: int = os.fstat(fd).st_size
        self.what = what

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; raises UnsafeImage if the file is shorter."""
        if length < 0 or offset < 0 or length > MAX_READ:
            raise UnsafeImage(f"{self.what} header asks to read {length} bytes at offset {offset}, "
                              "which no valid image does")
        if offset + length > self.size:
            raise UnsafeImage(f"{self.what} is truncated: its header points at offset {offset + length}, "
                              f"beyond the end of the file ({self.size} bytes)",
                              "download it again; check its checksum")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise UnsafeImage(f"{self.what} changed while it was being inspected")
        return data

    def read_upto(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end of the file)."""
        if offset >= self.size:
            return b""
        return self.read_at(offset, min(length, self.size - offset))

    def unpack(self, fmt: str, offset: int) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.read_at(offset, struct.calcsize(fmt)))

    def read_array(self, offset: int, count: int, item: str) -> Iterator[int]:
        """The ``count`` integers of a table at ``offset`` (``item``: a struct code with its byte
        order, e.g. ">Q"), read 1 MiB at a time: a table may be far larger than memory should hold."""
        order, code = item[0], item[1:]
        size = struct.calcsize(item)
        per_read = ARRAY_READ // size
        for start in range(0, count, per_read):
            n = min(per_read, count - start)
            yield from struct.unpack(f"{order}{n}{code}", self.read_at(offset + size * start, size * n))

