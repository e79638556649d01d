"""The buffers between xzparallel.py's threads: one block's bytes, in order, within budgets.

The blocks decoded ahead of the one being read must wait somewhere: a few MiB in memory for all
of them together, the rest in unlinked files in the spool directory up to a budget, and runs of
zeros as their length only (a disk image is mostly zeros).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import IO, Protocol

from instance_cloudimage.disk.sparse import write_all
from instance_cloudimage.runtime.errors import ConversionError

MiB = 1024 * 1024
OUT_CHUNK = MiB  # decompressed bytes per decompress() call, the largest piece of zeros handed out
MEMORY_BUDGET = 4 * MiB  # bytes all buffers together keep in memory (beyond: spill or wait)
CURRENT_CAP = 2 * MiB  # decoded bytes of the block being read kept before its decoder waits
SPILL_BUDGET = 256 * MiB  # decoded bytes of the blocks ahead kept in spill files (zeros: none)
INPUT_SPILL_CAP = 256 * MiB  # compressed bytes of one block in its spill file
ZERO = bytes(OUT_CHUNK)


class Pipeline(Protocol):
    """What a Buffer shares with its pipeline; every field is guarded by ``cv``."""

    cv: threading.Condition
    current: int  # the block being read
    memory: int  # bytes kept in memory by all buffers
    spilled: int  # decoded bytes kept in spill files by all buffers
    spool_dir: Path
    what: str

    def check(self) -> None: ...


Part = bytes | bytearray | int | tuple[int, int]  # data, a run of zeros, (offset, length) spilled


class Buffer:
    """One block's bytes in order, its compressed input or its decoded output; one thread puts,
    one takes.  Bytes wait in memory while the pipeline's memory budget allows, else in an
    unlinked spill file, else the producer waits.  The output of the block being read never
    spills (its reader is at work: its decoder waits for it instead); an input may always
    spill, up to the block's size: the splitter must get past it to feed the next blocks."""

    def __init__(self, pipe: Pipeline, index: int, *, is_input: bool) -> None:
        self.pipe = pipe
        self.index = index
        self.is_input = is_input
        self.parts: deque[Part] = deque()
        self.offset = 0  # bytes of parts[0] already taken
        self.memory = 0
        self.spilled = 0
        self.file: IO[bytes] | None = None
        self.ended = False

    def _place(self, n: int) -> str | None:
        """Where ``n`` more bytes go now: "memory", "file", or None (wait).  Lock held."""
        pipe = self.pipe
        if not self.is_input and pipe.current == self.index:
            return "memory" if self.memory + n <= CURRENT_CAP or not self.memory else None
        if pipe.memory + n <= MEMORY_BUDGET or (self.is_input and not self.memory):
            return "memory"
        if self.is_input:
            return "file" if self.spilled + n <= INPUT_SPILL_CAP else None
        return "file" if pipe.spilled + n <= SPILL_BUDGET else None

    def put(self, data: bytes | bytearray, zero: bool = False) -> None:
        pipe = self.pipe
        with pipe.cv:
            while True:
                pipe.check()
                if zero:
                    if self.parts and isinstance(self.parts[-1], int):
                        self.parts[-1] += len(data)
                    else:
                        self.parts.append(len(data))
                    pipe.cv.notify_all()
                    return
                place = self._place(len(data))
                if place == "memory":
                    self.parts.append(data)
                    self.memory += len(data)
                    pipe.memory += len(data)
                    pipe.cv.notify_all()
                    return
                if place == "file":
                    break
                pipe.cv.wait()
        try:
            if self.file is None:
                pipe.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                self.file = tempfile.TemporaryFile(dir=pipe.spool_dir, prefix="xz-")
            write_all(self.file.fileno(), data, self.spilled)
        except OSError as e:
            raise ConversionError(f"the {pipe.what} could not be decompressed: writing into the spool directory "
                                  f"{pipe.spool_dir} failed: {e.strerror}") from None
        with pipe.cv:
            self.parts.append((self.spilled, len(data)))
            self.spilled += len(data)
            pipe.spilled += 0 if self.is_input else len(data)
            pipe.cv.notify_all()

    def end(self) -> None:
        with self.pipe.cv:
            self.ended = True
            self.pipe.cv.notify_all()

    def take(self, limit: int) -> bytes | bytearray | memoryview | None:
        """Up to ``limit`` next bytes, None once the producer ended and all was taken."""
        pipe = self.pipe
        with pipe.cv:
            while not self.parts:
                pipe.check()
                if self.ended:
                    return None
                pipe.cv.wait()
            part, start = self.parts[0], self.offset
            length = part if isinstance(part, int) else part[1] if isinstance(part, tuple) else len(part)
            n = min(limit, length - start, OUT_CHUNK if isinstance(part, int) else length)
            self.offset += n
            if self.offset == length:
                self.parts.popleft()
                self.offset = 0
            if isinstance(part, (bytes, bytearray)):
                self.memory -= n
                pipe.memory -= n
                pipe.cv.notify_all()
            elif isinstance(part, tuple) and not self.is_input:
                pipe.spilled -= n
                pipe.cv.notify_all()
        if isinstance(part, int):
            return memoryview(ZERO)[:n]
        if isinstance(part, tuple):
            assert self.file is not None
            return os.pread(self.file.fileno(), n, part[0] + start)
        return memoryview(part)[start:start + n] if n < len(part) else part

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
