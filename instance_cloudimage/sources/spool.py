"""A file filled by one producer thread while one consumer reads it behind the producer.

The producer is a download (sources/download.py), a copy of a local file, or a pass that only hashes a
local file used in place; the consumer (the disk writer) reads with ``pread`` up to what the
producer has published, and sees the end only once the producer has verified everything.  This
module needs nothing from the network side, so local images never import an HTTP stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterable

from instance_cloudimage.runtime.errors import ImageFetchError
from instance_cloudimage.runtime.log import Progress

CHUNK = 1024 * 1024


class Hasher:
    """sha256 always (the cache key), plus any other algorithm a checksum needs."""

    def __init__(self, algorithms: Iterable[str] = ()) -> None:
        self.algorithms = sorted({"sha256", *algorithms})
        self.reset()

    def reset(self) -> None:
        self._h = {a: hashlib.new(a) for a in self.algorithms}

    def update(self, data: bytes | memoryview) -> None:
        for h in self._h.values():
            h.update(data)

    def digests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self._h.items()}


class Cancelled(BaseException):
    """The consumer went away; the producer stops at the next chunk."""


class Spool:
    """A file filled by one producer thread and read by one consumer, with a shared state."""

    def __init__(self, fd: int, *, filled: int = 0, done: bool = False) -> None:
        self.fd = fd
        self._cond = threading.Condition()
        self._filled = filled
        self._done = done
        self._error: BaseException | None = None
        self.cancelled = False
        self.thread: threading.Thread | None = None

    # producer side
    def advance(self, filled: int) -> None:
        with self._cond:
            self._filled = filled
            self._cond.notify_all()

    def succeed(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._done = True
            self._cond.notify_all()

    # consumer side
    def wait(self, want: int) -> int:
        """Block until ``want`` bytes are there or the body is complete; return what is there."""
        with self._cond:
            while self._filled < want and not self._done:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return self._filled

    def join(self) -> None:
        with self._cond:
            while not self._done:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def start(self, target: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                target()
            except Cancelled:
                self.fail(ImageFetchError("the download was cancelled"))
            except BaseException as e:  # handed to the consumer, who raises it
                self.fail(e)
            else:
                self.succeed()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def cancel(self, timeout: float) -> None:
        self.cancelled = True
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)


ZERO_CHUNK = bytes(4 * CHUNK)


def copy_file(src_fd: int, spool: Spool, hasher: Hasher, *, total: int, what: str) -> int:
    """The producer for a local file: copy into the spool while hashing; return the size."""
    pos = 0
    with Progress(f"reading {what}", total) as progress:
        while True:
            if spool.cancelled:
                raise Cancelled()
            chunk = os.read(src_fd, 4 * CHUNK)
            if not chunk:
                break
            # All-zero chunks stay holes in the fresh spool file: a sparse raw image costs its
            # data, not its virtual size, and reads back the same.
            if chunk != (ZERO_CHUNK if len(chunk) == len(ZERO_CHUNK) else bytes(len(chunk))):
                os.pwrite(spool.fd, chunk, pos)
                pos += len(chunk)
            else:
                pos += len(chunk)
                os.ftruncate(spool.fd, pos)  # the file only grows by its writes: a skipped chunk extends it
            hasher.update(chunk)
            progress.update(len(chunk))
            spool.advance(pos)
    return pos


def hash_fd(fd: int, hasher: Hasher, *, total: int, what: str | None, spool: Spool | None = None) -> int:
    """Hash the whole file behind ``fd`` (read with ``pread`` from offset 0); return its size.

    ``what`` names it in the progress lines ("verifying <what>"), None for none.  With a
    ``spool``, this is the producer for a local file used in place: the consumer reads the same
    descriptor, and ``advance`` only tells it how far the bytes have been hashed, so a stream
    ends (and a checksum error surfaces) exactly as for a copy."""
    view = memoryview(bytearray(4 * CHUNK))
    pos = 0
    with Progress(f"verifying {what}", total) if what else contextlib.nullcontext() as progress:
        while True:
            if spool is not None and spool.cancelled:
                raise Cancelled()
            n = os.preadv(fd, [view], pos)
            if not n:
                break
            hasher.update(view[:n])
            pos += n
            if progress is not None:
                progress.update(n)
            if spool is not None:
                spool.advance(pos)
    return pos
