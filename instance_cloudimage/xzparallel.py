"""Multi-block .xz decoded in parallel, in process, in order, with bounded memory.

``xz -T0`` decodes a multi-block stream fast but keeps whole blocks in memory per thread
(~150 MiB for 24 MiB blocks); ``xz -T1`` is small but single-threaded.  Multi-threaded xz
writes each block's compressed and uncompressed sizes into its header, so the blocks can be
found while streaming.  One thread (the splitter) reads the source once, in order (the checksum
is hashed as it is read), and hands every block, wrapped in a one-block stream of its own
(stream header, the block, a one-record index, a footer; small blocks go several to a stream),
to a pool of workers that decode them with ``lzma.LZMADecompressor``: liblzma checks each
block's header, sizes, padding and check in C, without the GIL.  The splitter checks what the
blocks no longer tell liblzma: the real index against the blocks, the footer, the padding and
what follows a stream.

The output is read in order, so the blocks decoded ahead wait in Buffers (xzbuffers.py): a
few MiB in memory for all of them together, the rest in unlinked files in the spool directory
up to a budget (runs of zeros take no space at all), within a window of a few blocks per
worker; the splitter reads at most one block beyond what the workers took.  So memory stays
bounded whatever the block size, and one slow block does not hold the other workers up.
Whatever does not fit this shape (one CPU, no sizes in the first block header, a check liblzma
cannot verify, a dictionary too large for two decoders within the budget, an empty stream)
goes, before any output, to the external decoder (``xz -T0``, as before).  A later stream that
does not fit is decoded by the splitter itself, in order, with the same checks (starting a
process under resource limits while threads run is not fork-safe, and Python's LZMAFile
ignores trailing garbage).
"""

from __future__ import annotations

import itertools
import logging
import lzma
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from instance_cloudimage.image.wrappers import Layer, Readable
from instance_cloudimage.runtime.errors import ConversionError

from .xzbuffers import OUT_CHUNK, ZERO, Buffer, MiB
from .xzformat import (
    HEADER_SIZE,
    MAGIC,
    VERIFIED_CHECKS,
    BlockHeader,
    ByteReader,
    Truncated,
    XzFormatError,
    check_footer,
    parse_stream_header,
    read_block_header,
    read_index,
    synthetic_tail,
)

log = logging.getLogger(__name__)

IN_CHUNK = MiB  # compressed bytes per read and per decompress() call
DICT_BUDGET = 64 * MiB  # dictionary memory of the blocks being decoded at once
MAX_WORKERS = 4
# Blocks decoded at once or ahead, per worker: blocks differ in cost (zeros decode 20x faster
# than data), so a worker done early goes on with later blocks instead of idling.
WINDOW_PER_WORKER = 4
BATCH = MiB  # small blocks go to the workers together, up to this many decoded bytes
MAX_BATCH = 64  # or this many blocks
MEMLIMIT = 1024 * MiB  # liblzma's limit per decoder; a hostile header must not take the host's
HINT = "download it again; check its checksum"
External = Callable[[Readable], Layer]


class Closed(Exception):
    """The layer was closed: every thread stops."""


def count_workers() -> int:
    return min(len(os.sched_getaffinity(0)), MAX_WORKERS)


def external_reason(check: int, block: BlockHeader | None, workers: int) -> str | None:
    """Why a stream starting with ``block`` goes to the external decoder, or None."""
    if workers < 2:
        return "one CPU"
    if block is None:
        return "the stream has no blocks"
    if check not in VERIFIED_CHECKS:
        return f"check type {check} is not verified by liblzma"
    if block.compressed is None or block.uncompressed is None:
        return "its block headers do not record their sizes (single-threaded xz)"
    if block.dict_size is None or 2 * block.dict_size > DICT_BUDGET:
        return "its filter chain needs more memory than two in-process decoders may take"
    return None


def dict_weight(block: BlockHeader | None) -> int:
    """The dictionary memory that decoding the stream from ``block`` on takes, for the budget."""
    return min(block and block.dict_size or DICT_BUDGET, DICT_BUDGET)


def refusal(what: str, error: XzFormatError) -> ConversionError:
    if isinstance(error, Truncated):
        return ConversionError(f"the {what} is truncated (it ends inside an xz stream)", HINT)
    return ConversionError(f"the {what} is corrupt: {error}", HINT)


@dataclass
class Job:
    index: int
    name: str
    weight: int  # the dictionary memory its decoder takes
    input: Buffer
    output: Buffer


class ParallelXz(Layer):
    """The decoded bytes of an .xz whose first block has been read and found fit."""

    def __init__(self, reader: ByteReader, header: bytes, block: BlockHeader, workers: int,
                 spool_dir: Path, what: str) -> None:
        self.what = what
        self.reader = reader
        self.workers = workers
        self.spool_dir = spool_dir
        self.cv = threading.Condition()
        self.jobs: dict[int, Job] = {}
        self.created = self.claimed = self.current = 0
        self.used = 0  # dictionary bytes being decoded
        self.memory = self.spilled = 0  # bytes kept in memory, decoded bytes kept in spill files
        self.split_done = False
        self.unsplit = 0  # later streams that the splitter decoded itself
        self.error: BaseException | None = None
        self.closed = False
        self.threads = [threading.Thread(target=self._split, args=(header, block), name="xz-split", daemon=True)]
        self.threads += [threading.Thread(target=self._work, name=f"xz-{i}", daemon=True) for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def check(self) -> None:
        """Raise what stops every thread (called with the lock held)."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise Closed()

    def _fail(self, error: BaseException) -> None:
        if isinstance(error, XzFormatError):
            error = refusal(self.what, error)
        elif isinstance(error, lzma.LZMAError):
            error = ConversionError(f"the {self.what} is corrupt: {error}", HINT)
        with self.cv:
            if self.error is None and not isinstance(error, Closed):
                self.error = error
            self.cv.notify_all()

    # --- the splitter ---------------------------------------------------------------------

    def _split(self, header: bytes, block: BlockHeader | None) -> None:
        try:
            for number in itertools.count(1):
                check = parse_stream_header(header)
                if external_reason(check, block, self.workers) is None:
                    self._split_stream(header, check, block)
                elif check not in VERIFIED_CHECKS:  # xz warns and exits with status 2: we refuse
                    raise XzFormatError(f"a stream uses check type {check}, which cannot be verified")
                else:
                    self._decode_stream(header, block, f"stream {number}")
                next_header = self._next_stream()
                if next_header is None:
                    break
                header = next_header
                parse_stream_header(header)
                block = read_block_header(self.reader)
            with self.cv:
                self.split_done = True
                self.cv.notify_all()
        except BaseException as e:
            self._fail(e)

    def _split_stream(self, header: bytes, check: int, block: BlockHeader | None) -> None:
        """Hand the blocks of a stream to the workers, small ones several to a job (each job
        costs ~0.2 ms); check the stream's index and footer."""
        seen: list[tuple[int, int]] = []
        job: Job | None = None
        records: list[tuple[int, int]] = []
        while block is not None:
            if block.compressed is None or block.uncompressed is None:
                raise ConversionError(f"the {self.what} mixes blocks with and without recorded sizes in "
                                      "one stream, which cannot be split", "recompress it with xz -T0")
            if job is None:
                job = self._add_job(f"block {len(seen) + 1}", dict_weight(block), claim=False)
                job.input.put(header)
                records = []
            self._feed(job, block, check)
            records.append((block.unpadded(check), block.uncompressed))
            seen.append(records[-1])
            block = read_block_header(self.reader)
            if (block is None or dict_weight(block) != job.weight or len(records) == MAX_BATCH
                    or sum(size for _, size in records) >= BATCH):
                if len(records) > 1:
                    job.name = f"blocks {len(seen) - len(records) + 1}-{len(seen)}"
                job.input.put(synthetic_tail(header, records))
                job.input.end()
                job = None
        index_size = read_index(self.reader.read_exact, seen)
        check_footer(self.reader.read_exact(HEADER_SIZE), header, index_size)

    def _decode_stream(self, header: bytes, block: BlockHeader | None, name: str) -> None:
        """Decode a whole stream here, in order: liblzma checks all of it, and says where it ends."""
        job = self._add_job(name, dict_weight(block), claim=True)
        self.unsplit += 1
        consumed = header + (block.raw if block is not None else b"\0")

        def pieces() -> Iterator[bytes | bytearray]:
            yield consumed
            while True:
                yield self.reader.read_some(IN_CHUNK)

        decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=MEMLIMIT)
        try:
            self._inflate(decoder, pieces(), job)
        finally:
            self._release(job)
        self.reader.unread(decoder.unused_data)

    def _add_job(self, name: str, weight: int, *, claim: bool) -> Job:
        index = self.created
        job = Job(index, name, weight, Buffer(self, index, is_input=True), Buffer(self, index, is_input=False))
        with self.cv:
            # One block ahead of the decoders at most: the input is read once, in order.
            while self.claimed < index or (claim and self.used and self.used + weight > DICT_BUDGET):
                self.check()
                self.cv.wait()
            self.jobs[index] = job
            self.created += 1
            if claim:
                self.claimed += 1
                self.used += weight
            self.cv.notify_all()
        return job

    def _next_stream(self) -> bytes | None:
        """After a stream footer: skip the stream padding; the next stream's header or None."""
        padding = self.reader.skip_zeros()
        header = self.reader.read_upto(HEADER_SIZE)
        if padding % 4:
            raise XzFormatError("its stream padding is not a multiple of four bytes")
        if header and not header.startswith(MAGIC[:len(header)]):
            raise XzFormatError("it has data that is not xz after its last stream")
        if header and len(header) < HEADER_SIZE:
            raise Truncated("truncated")
        return header or None

    def _feed(self, job: Job, block: BlockHeader, check: int) -> None:
        job.input.put(block.raw)
        remaining = block.span(check)
        while remaining:
            chunk = self.reader.read_some(min(remaining, IN_CHUNK))
            job.input.put(chunk)
            remaining -= len(chunk)

    # --- the workers ----------------------------------------------------------------------

    def _claim(self) -> Job | None:
        with self.cv:
            while True:
                self.check()
                if self.claimed < self.created:
                    job = self.jobs[self.claimed]
                    if job.index < self.current + self.workers * WINDOW_PER_WORKER and (
                            not self.used or self.used + job.weight <= DICT_BUDGET):
                        self.claimed += 1
                        self.used += job.weight
                        return job
                elif self.split_done:
                    return None
                self.cv.wait()

    def _work(self) -> None:
        try:
            while (job := self._claim()) is not None:
                decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=MEMLIMIT)
                try:
                    self._inflate(decoder, iter(lambda: job.input.take(IN_CHUNK), None), job)
                finally:
                    self._release(job)
                if decoder.unused_data or job.input.take(1) is not None:
                    raise XzFormatError(f"{job.name} has data after its end")
                job.input.release()
        except BaseException as e:
            self._fail(e)

    def _release(self, job: Job) -> None:
        with self.cv:
            self.used -= job.weight
            self.cv.notify_all()

    def _inflate(self, decoder: lzma.LZMADecompressor, pieces: Iterator[bytes | bytearray | memoryview],
                 job: Job) -> None:
        """Decode ``pieces`` into the job's output until the stream ends."""
        try:
            for piece in pieces:
                out = decoder.decompress(piece, OUT_CHUNK)
                while True:
                    if out:
                        job.output.put(out, zero=out == ZERO if len(out) == OUT_CHUNK else out == ZERO[:len(out)])
                    if decoder.eof or decoder.needs_input:
                        break
                    out = decoder.decompress(b"", OUT_CHUNK)
                if decoder.eof:
                    job.output.end()
                    return
        except lzma.LZMAError as e:
            raise ConversionError(f"the {self.what} is corrupt: {job.name}: {e}", HINT) from None
        raise XzFormatError(f"{job.name} ends early")

    # --- the reader -----------------------------------------------------------------------

    def readinto(self, buf: bytearray | memoryview) -> int:
        while True:
            with self.cv:
                while (job := self.jobs.get(self.current)) is None:
                    self.check()
                    if self.split_done and self.current == self.created:
                        break
                    self.cv.wait()
            if job is None:
                return 0
            piece = job.output.take(len(buf))
            if piece is not None:
                memoryview(buf)[:len(piece)] = piece
                return len(piece)
            job.output.release()
            with self.cv:
                del self.jobs[self.current]
                self.current += 1
                self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        for thread in self.threads:
            thread.join(timeout=10)
        # Spill files close when their last user lets go (a thread still blocked on the source).
        self.jobs.clear()


def open_xz(source: Readable, what: str, spool_dir: Path, external: External) -> Layer:
    """Decode ``source`` in parallel if its first block allows it, else with ``external``."""
    reader = ByteReader(source)
    try:
        header = reader.read_exact(HEADER_SIZE)
        check = parse_stream_header(header)
        block = read_block_header(reader)
    except XzFormatError as e:
        raise refusal(what, e) from None
    workers = count_workers()
    reason = external_reason(check, block, workers)
    if reason is not None or block is None:
        consumed = header + (block.raw if block is not None else b"\0")
        log.debug("the %s goes to the external decoder: %s", what, reason)
        return external(reader.replay(consumed))
    log.debug("decoding the %s with %d threads", what, workers)
    return ParallelXz(reader, header, block, workers, spool_dir, what)
