"""Writing a verified, detected image onto the instance's disk with qemu-img.

``qemu-img`` always gets an explicit ``-f`` and its source through ``--image-opts`` so that no
path string is ever parsed as a protocol (image-safety.md §C.13, §D.20); ``qemu-img info`` runs
under resource limits as a second opinion on our own inspector (§C.17).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .detect import DetectedImage
from .errors import CommandError, ConversionError, ImageTooLarge, UnsafeImage
from .formats import DiskFormat
from .log import format_size
from .process import Limits, run, run_text

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
INFO_LIMITS = Limits(address_space=1024**3, cpu_seconds=30)
# qemu-img convert reserves address space per thread; MALLOC_ARENA_MAX keeps it under 2 GiB.
CONVERT_LIMITS = Limits(address_space=2 * 1024**3)
CONVERT_ENV = {"MALLOC_ARENA_MAX": "3"}


def image_opts(fmt: DiskFormat, path: Path) -> str:
    """An --image-opts string; commas in values must be doubled."""
    return f"driver={fmt.value},file.driver=file,file.filename={os.fspath(path).replace(',', ',,')}"


def target_size(path: str) -> int:
    """Size in bytes of a block device or regular file."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("Q", buf)[0])
        finally:
            os.close(fd)
    return st.st_size


def inspect_with_qemu(path: Path, detected: DetectedImage) -> dict[str, Any]:
    """``qemu-img info -f <detected>`` under limits; refuse anything our inspector missed."""
    try:
        out = run_text(["qemu-img", "info", "--output=json", "--image-opts", image_opts(detected.format, path)],
                       limits=INFO_LIMITS, env=CONVERT_ENV, timeout=120)
    except CommandError as e:
        raise UnsafeImage(f"qemu-img cannot read the {detected.format.value} image: "
                          f"{e.stderr.strip().splitlines()[-1] if e.stderr.strip() else 'no reason given'}") from None
    info: dict[str, Any] = json.loads(out)
    fmt = info.get("format")
    if fmt != detected.format.value:
        raise UnsafeImage(f"qemu-img reads the image as {fmt}, our inspector as {detected.format.value}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UnsafeImage("image has a backing file, which could read host files")
    if info.get("encrypted"):
        raise UnsafeImage("image is encrypted")
    if info.get("dirty-flag"):
        raise UnsafeImage("image is marked dirty")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise UnsafeImage("image uses an external data file, which could read host files")
    if data.get("corrupt"):
        raise UnsafeImage("image is marked corrupt")
    if int(info.get("virtual-size", -1)) != detected.virtual_size:
        raise UnsafeImage("qemu-img and our inspector disagree about the image's virtual size")
    return info


def check_fits(virtual_size: int, disk_path: str) -> int:
    """Raise ImageTooLarge unless the image fits; return the disk's size."""
    size = target_size(disk_path)
    if virtual_size > size:
        raise ImageTooLarge(
            f"image virtual size {format_size(virtual_size)} ({virtual_size} bytes) is larger than "
            f"the disk, {format_size(size)} ({size} bytes)",
            "create the instance with a larger disk 0",
        )
    return size


@dataclass(frozen=True)
class WriteResult:
    bytes_virtual: int
    disk_size: int


def write_image(source: Path, detected: DetectedImage, disk_path: str) -> WriteResult:
    """Convert ``source`` (format ``detected``) onto ``disk_path`` (block device or file)."""
    disk_size = check_fits(detected.virtual_size, disk_path)
    inspect_with_qemu(source, detected)
    argv = [
        "qemu-img", "convert", "-n", "-p" if os.isatty(2) else "-q",
        "-t", "writeback", "-W", "-m", "8",
        "--image-opts", image_opts(detected.format, source),
        "-O", "raw", disk_path,
    ]
    log.info("writing %s image (%s virtual) onto %s", detected.format.value,
             format_size(detected.virtual_size), disk_path)
    try:
        run(argv, stdout=None, limits=CONVERT_LIMITS, env=CONVERT_ENV)
    except CommandError as e:
        reason = e.stderr.strip().splitlines()[-1] if e.stderr.strip() else f"exit code {e.returncode}"
        raise ConversionError(f"qemu-img convert failed: {reason}") from None
    return WriteResult(detected.virtual_size, disk_size)
