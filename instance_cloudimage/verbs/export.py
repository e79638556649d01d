"""export: stream disk EXPORT_INDEX to stdout (docs/lifecycle.md, "Export").

The stream is the compact format of disk/exportstream.py (or raw, if the site asks), after
announcing on EXP_SIZE_FD how many bytes to expect.  A URI-only disk is first copied out of its
URI into a staging file.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import ExitStack

from instance_cloudimage.disk import exportstream as ds
from instance_cloudimage.disk.convert import target_size
from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.runtime.errors import ConversionError
from instance_cloudimage.runtime.log import Progress, format_size
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.verbs.transfer import transfer_disk

log = logging.getLogger(__name__)


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
