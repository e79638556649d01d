"""import: write a disk from stdin onto IMPORT_DEVICE (docs/lifecycle.md, "Import").

The stream is either our compact format or a plain raw disk from another provider, told apart
by the magic.  A URI-only disk gets the whole stream in a staging file, copied onto the URI only
once the stream checked out.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from instance_cloudimage.disk import exportstream as ds
from instance_cloudimage.disk import importstream as ims
from instance_cloudimage.disk.convert import target_size
from instance_cloudimage.disk.sparse import DiskWriter, blank_ends
from instance_cloudimage.disk.staging import staging_errors
from instance_cloudimage.disk.uri import copy_to_uri
from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.ganeti.uri import redact_uri
from instance_cloudimage.runtime.log import Progress, complete_step, format_size
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.verbs.transfer import TransferDisk, transfer_disk

log = logging.getLogger(__name__)


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



def blank_failed_import(path: str, name: str) -> None:
    """Ganeti reports an import whose script failed as a success, with a warning only, and the
    instance would boot whatever part of the disk was written: make it unbootable instead."""
    try:
        blank_ends(path)
    except OSError as e:
        log.warning("could not blank %s after the failed import (%s); do not start the instance", name, e.strerror)
        return
    log.warning("%s was left unbootable (its first and last MiB zeroed) because the import failed; Ganeti "
                "still reports the import as done: remove the instance and import it again", name)


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
            raise ims.StreamError(f"the raw import stream is larger than the target disk ({max_size} bytes)",
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
    URI-only disk, on its staging file before that is copied out (the re-seed: seed/reseed.py).
    A URI-only disk is written only after the whole stream checked out: a truncated or corrupt
    stream leaves it untouched.
    """
    with ExitStack() as stack:
        disk = transfer_disk(genv, site, stack, "IMPORT")
        src = source or open(sys.stdin.fileno(), "rb", buffering=0, closefd=False)
        with staging_errors(site):
            # A URI-only disk's staging file is dropped on failure: the disk itself is never written.
            extent = import_stream(disk.path, disk.describe(), src, blank_on_failure=disk.uri is None)
        if after_write is not None:
            after_write(disk.path)
        write_staged(disk, extent)


def import_stream(device: str, name: str, src: BinaryIO, *, blank_on_failure: bool = True) -> int:
    """Write the stream onto the local path ``device`` (``name`` in the log); returns the bytes of
    the disk it covered.  Raises ConversionError (StreamError).

    When the stream fails after something was written, ``device`` is left unbootable
    (``blank_failed_import``); a stream refused before any write leaves it untouched.
    """
    size = target_size(device)
    head = read_some(src, ds.HEADER.size)
    if not head:
        # No disk is zero bytes long: the export side never sent anything.
        raise ims.StreamError("the import stream is empty", "the export side failed; see its log")
    with DiskWriter(device) as writer:
        try:
            return write_stream(writer, head, src, size, name)
        except BaseException:
            if blank_on_failure and writer.touched:
                blank_failed_import(device, name)
            raise


def write_stream(writer: DiskWriter, head: bytes, src: BinaryIO, size: int, name: str) -> int:
    """The body of ``import_stream``: our stream or a raw one, by the first bytes ``head``."""
    if head[:len(ds.MAGIC)] == ds.MAGIC:
        if len(head) < ds.HEADER.size:
            raise ims.StreamError("the import stream is truncated (it ended inside its header)")
        header = ims.parse_header(head)
        with Progress(f"importing a {format_size(header.disk_size)} disk onto {name}", header.disk_size) as prog:
            pos = 0

            def on_data(offset: int, data: bytes) -> None:
                nonlocal pos
                writer.zero(pos, offset - pos)
                writer.write(offset, data)
                prog.update(offset + len(data) - pos)
                pos = offset + len(data)

            data_bytes = ims.read_records(ims.Reader(src, header.compressed), header, size, on_data)
            writer.zero(pos, header.disk_size - pos)
            prog.update(header.disk_size - pos)
        log.info("imported %s of data onto the %s disk %s", format_size(data_bytes),
                 format_size(header.disk_size), name)
        return header.disk_size
    if ims.looks_damaged(head):
        raise ims.StreamError("the import stream's header is damaged", "export the disk again")
    with Progress(f"importing a raw disk image onto {name}", size) as prog:
        written = import_raw(head, src, writer, size, prog.update)
    log.info("imported a raw stream of %s onto %s", format_size(written), name)
    if written < size:
        log.warning("the raw stream (%d bytes) is shorter than the disk (%d bytes); a raw stream carries no "
                    "length, so a truncated transfer cannot be told from a smaller disk; the rest of the "
                    "disk was left as it was", written, size)
    return written
