"""export, import and rename (the README's "Export, import and rename").

export streams disk EXPORT_INDEX to stdout in the compact format of diskstream.py (or raw, if
the site asks), after announcing on EXP_SIZE_FD how many bytes to expect.  import reads either
that format or a plain raw disk from another provider (told apart by the magic), onto
IMPORT_DEVICE.  A disk reachable only through a URI (IMPORT_DISK_URI/EXPORT_DISK_URI) goes
through a local staging file (staging.py): export copies it out of the URI first, import writes
the whole stream into it and copies it onto the URI only once the stream checked out.  rename puts
the new name into the instance's seeds (seedrename.py) and never fails the job for a cosmetic
reason.

Both import and export run with Ganeti's non-reset environment (LC_ALL=C, the node daemon's
variables); that is harmless, since env.py parses only the variables it knows.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from instance_cloudimage.disk import exportstream as ds
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.disk.convert import target_size
from instance_cloudimage.disk.sparse import DiskWriter
from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.runtime.errors import CommandError, ConversionError, EnvironmentError_, UserError
from instance_cloudimage.runtime.log import Progress, complete_step, format_size
from instance_cloudimage.seed.rename import rename_seeds
from instance_cloudimage.disk.staging import stage_uri, staging_errors
from instance_cloudimage.disk.uri import copy_to_uri, redact_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferDisk:
    """The disk of an import or export, as a local path: the device, or a URI's staging file."""

    path: str
    uri: str | None = None  # set when ``path`` is a staging file standing in for this URI

    def describe(self) -> str:
        return redact_uri(self.uri) if self.uri else self.path


def transfer_disk(genv: GanetiEnv, site: SiteConfig, stack: ExitStack, word: str) -> TransferDisk:
    """The local path to read (EXPORT) or write (IMPORT).  A URI-only disk gets a staging file,
    removed when ``stack`` unwinds; for an export it is first filled from the URI.
    Raises EnvironmentError_ or ConversionError."""
    t = genv.transfer
    if t is None:
        raise EnvironmentError_(f"${word}_DEVICE or ${word}_DISK_URI must be set")
    if t.device is not None:
        return TransferDisk(t.device)
    assert t.uri is not None  # env.py: a transfer has a device or a URI
    staging = stage_uri(site, t.uri, f"{word}_DISK_URI", "the disk", stack, copy_in=word == "EXPORT")
    return TransferDisk(os.fspath(staging), t.uri)


def write_staged(disk: TransferDisk, extent: int) -> None:
    """Copy the first ``extent`` bytes of an import's staging file onto its URI (nothing for a device).

    Only these bytes: the rest of the disk stays as it was, as it does on a device.  A partial
    last sector is copied whole (qemu-img works in sectors; the staging file has zeros there).
    """
    if disk.uri is None:
        return
    os.truncate(disk.path, -(-extent // 512) * 512)
    with complete_step(f"writing the imported disk onto {redact_uri(disk.uri)}"):
        copy_to_uri(Path(disk.path), disk.uri)


def announce_size(genv: GanetiEnv, size: int) -> None:
    """Tell Ganeti how many bytes to expect (it only drives the progress and ETA it shows)."""
    t = genv.transfer
    if t is None or t.size_fd is None:
        return
    try:
        os.write(t.size_fd, f"{size}\n".encode())
    except OSError as e:
        log.warning("could not write the export size to EXP_SIZE_FD: %s", e.strerror)
    except OverflowError:  # a number no descriptor can have
        log.warning("could not write the export size to EXP_SIZE_FD: it is not a file descriptor")


class FdSink:
    """Unbuffered writes to a file descriptor, retried until complete."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0

    def write(self, data: bytes | memoryview, /) -> int:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self.written += n
        except BrokenPipeError:
            # Ganeti's import side (or the transfer daemon) died: its log says why.
            raise ConversionError(f"the export stream's reader went away after {self.written} bytes",
                                  "the import side or the transfer failed; see its log") from None
        except OSError as e:
            raise ConversionError(f"writing the export stream failed after {self.written} bytes: "
                                  f"{e.strerror}") from None
        return len(data)


# --- export -------------------------------------------------------------------------------------

def export_raw(fd: int, size: int, sink: FdSink, prog: Progress) -> None:
    buf = bytearray(ds.CHUNK)
    pos = 0
    while pos < size:
        n = ds.read_full(fd, buf, pos, min(ds.CHUNK, size - pos))
        if n == 0:
            raise ConversionError(f"the disk ended at byte {pos}, before its size of {size} bytes")
        sink.write(memoryview(buf)[:n])
        pos += n
        prog.update(n)


def run_export(genv: GanetiEnv, site: SiteConfig, out_fd: int | None = None) -> None:
    """The export script.  Raises EnvironmentError_ or ConversionError."""
    with ExitStack() as stack:
        disk = transfer_disk(genv, site, stack, "EXPORT")
        export_disk(genv, site, disk.path, disk.describe(), out_fd)


def export_disk(genv: GanetiEnv, site: SiteConfig, device: str, name: str, out_fd: int | None) -> None:
    """Stream the disk at the local path ``device`` (called ``name`` in the log)."""
    size = target_size(device)
    compact = site.get("export_format") == "compact"
    level = int(site.get("export_zstd_level")) if site.get("export_compression") == "zstd" else None
    sink = FdSink(sys.stdout.fileno() if out_fd is None else out_fd)
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Ganeti shows progress against this; an upper estimate is cheap, an exact count is not.
        announce_size(genv, ds.estimate_stream_size(fd, size) if compact else size)
        with Progress(f"exporting {format_size(size)} disk {name}", size) as prog:
            if not compact:
                export_raw(fd, size, sink, prog)
                return
            stats = ds.write_stream(fd, size, sink, zstd_level=level, progress=prog.update)
    finally:
        os.close(fd)
    ratio = 100 * stats.stream_bytes / size if size else 0
    log.info("exported %s of data from a %s disk as %s (%.1f%% of the disk%s)", format_size(stats.data_bytes),
             format_size(size), format_size(stats.stream_bytes), ratio, ", zstd" if level is not None else "")


# --- import -------------------------------------------------------------------------------------

def read_some(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream (a pipe returns what it has)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = src.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return b"".join(parts)


def import_raw(first: bytes, src: BinaryIO, writer: DiskWriter, max_size: int,
               progress: Callable[[int], None]) -> int:
    """A plain disk image (another provider's export): every byte, zero blocks as gaps."""
    buf = bytearray(ds.CHUNK)
    pos = 0
    pending = first
    while True:
        data = pending + read_some(src, ds.CHUNK - len(pending))
        pending = b""
        if not data:
            return pos
        n = len(data)
        if pos + n > max_size:
            raise ds.StreamError(f"the raw import stream is larger than the target disk ({max_size} bytes)",
                                 "import onto a disk at least as large as the exported one")
        buf[:n] = data
        last = 0
        for a, b in ds.nonzero_runs(buf, n):
            writer.zero(pos + last, a - last)
            writer.write(pos + a, memoryview(buf)[a:b])
            last = b
        writer.zero(pos + last, n - last)
        pos += n
        progress(n)


def run_import(genv: GanetiEnv, site: SiteConfig, source: BinaryIO | None = None,
               after_write: Callable[[str], None] | None = None) -> None:
    """The import script.  Raises ConversionError (StreamError) for a bad stream.

    ``after_write(local_path)`` runs once the disk's data is complete, on the device or, for a
    URI-only disk, on its staging file before that is copied out (the re-seed: reseed.py).
    A URI-only disk is written only after the whole stream checked out: a truncated or corrupt
    stream leaves it untouched.
    """
    with ExitStack() as stack:
        disk = transfer_disk(genv, site, stack, "IMPORT")
        src = source or open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
        with staging_errors(site):
            extent = import_stream(disk.path, disk.describe(), src)
        if after_write is not None:
            after_write(disk.path)
        write_staged(disk, extent)


def import_stream(device: str, name: str, src: BinaryIO) -> int:
    """Write the stream onto the local path ``device`` (``name`` in the log); returns the bytes of
    the disk it covered.  Raises ConversionError (StreamError)."""
    size = target_size(device)
    head = read_some(src, ds.HEADER.size)
    if not head:
        # No disk is zero bytes long: the export side never sent anything.
        raise ds.StreamError("the import stream is empty", "the export side failed; see its log")
    with DiskWriter(device) as writer:
        if head[:len(ds.MAGIC)] == ds.MAGIC:
            if len(head) < ds.HEADER.size:
                raise ds.StreamError("the import stream is truncated (it ended inside its header)")
            header = ds.parse_header(head)
            with Progress(f"importing a {format_size(header.disk_size)} disk onto {name}", header.disk_size) as prog:
                pos = 0

                def on_data(offset: int, data: bytes) -> None:
                    nonlocal pos
                    writer.zero(pos, offset - pos)
                    writer.write(offset, data)
                    prog.update(offset + len(data) - pos)
                    pos = offset + len(data)

                data_bytes = ds.read_records(ds.Reader(src, header.compressed), header, size, on_data)
                writer.zero(pos, header.disk_size - pos)
                prog.update(header.disk_size - pos)
            log.info("imported %s of data onto the %s disk %s", format_size(data_bytes),
                     format_size(header.disk_size), name)
            return header.disk_size
        if ds.looks_damaged(head):
            raise ds.StreamError("the import stream's header is damaged", "export the disk again")
        with Progress(f"importing a raw disk image onto {name}", size) as prog:
            written = import_raw(head, src, writer, size, prog.update)
    log.info("imported a raw stream of %s onto %s", format_size(written), name)
    if written < size:
        log.warning("the raw stream (%d bytes) is shorter than the disk (%d bytes); a raw stream carries no "
                    "length, so a truncated transfer cannot be told from a smaller disk; the rest of the "
                    "disk was left as it was", written, size)
    return written


# --- rename -------------------------------------------------------------------------------------

RenameStep = Callable[[GanetiEnv, SiteConfig], None]
# Steps that change the disk for a new name.
RENAME_STEPS: Sequence[tuple[str, RenameStep]] = (
    ("put the new name into the seed", rename_seeds),
)


def run_rename(genv: GanetiEnv, site: SiteConfig, steps: Sequence[tuple[str, RenameStep]] | None = None) -> None:
    """The rename script: each step is best effort, a failure only a warning.

    Ganeti itself treats a failed rename as a warning, but the job log then reads like an error;
    nothing a rename changes (hostname files) is worth that, so even a bug is only logged.
    """
    instance = genv.require_instance()
    for what, step in RENAME_STEPS if steps is None else steps:
        try:
            step(genv, site)
        except (UserError, CommandError) as e:
            log.warning("rename: could not %s (left unchanged): %s", what, e)
        except Exception as e:
            log.debug("rename step failed", exc_info=True)
            log.warning("rename: could not %s (left unchanged): %s: %s", what, type(e).__name__, e)
    log.info("renamed %s to %s", genv.old_instance_name, instance.name)
