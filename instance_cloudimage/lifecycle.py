"""export, import and rename.

export streams the raw disk to stdout and announces its size on EXP_SIZE_FD; import writes the
stream onto the device and refuses a stream longer than the disk.  rename puts the new name into
the instance's seeds (seedrename.py) and never fails the job for a cosmetic reason.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import BinaryIO

from .convert import target_size
from .env import GanetiEnv
from .errors import ConversionError, EnvironmentError_
from .log import Progress, format_size

log = logging.getLogger(__name__)
CHUNK = 4 * 1024 * 1024


def _device(genv: GanetiEnv) -> str:
    t = genv.transfer
    if t is None or t.device is None:
        raise EnvironmentError_("this disk is only reachable through a URI, which import/export "
                                "does not support; use kernelspace disk access")
    return t.device


def announce_size(genv: GanetiEnv, size: int) -> None:
    t = genv.transfer
    if t is None or t.size_fd is None:
        return
    try:
        os.write(t.size_fd, f"{size}\n".encode())
    except OSError as e:
        log.warning("could not write the export size to EXP_SIZE_FD: %s", e.strerror)


def run_export(genv: GanetiEnv, out: BinaryIO | None = None) -> None:
    device = _device(genv)
    size = target_size(device)
    announce_size(genv, size)
    sink = out or sys.stdout.buffer
    sent = 0
    with open(device, "rb") as f, Progress(f"exporting {format_size(size)}", size) as prog:
        while chunk := f.read(CHUNK):
            sink.write(chunk)
            sent += len(chunk)
            prog.update(len(chunk))
    sink.flush()
    if sent != size:
        raise ConversionError(f"export read {sent} bytes from {device}, expected {size}")


def run_import(genv: GanetiEnv, source: BinaryIO | None = None) -> None:
    device = _device(genv)
    size = target_size(device)
    src = source or sys.stdin.buffer
    written = 0
    with open(device, "r+b") as f, Progress("importing", size) as prog:
        while chunk := src.read(CHUNK):
            if written + len(chunk) > size:
                raise ConversionError(f"import stream is larger than the disk ({format_size(size)})",
                                      "import onto a disk at least as large as the exported one")
            f.write(chunk)
            written += len(chunk)
            prog.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    log.info("imported %s onto %s", format_size(written), device)


def run_rename(genv: GanetiEnv) -> None:
    from .seedrename import rename_seeds

    instance = genv.require_instance()
    rename_seeds(genv)
    log.info("renamed %s to %s", genv.old_instance_name, instance.name)
