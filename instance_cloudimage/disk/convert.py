"""Converting a verified, inspected image file onto the instance's disk with qemu-img.

``qemu-img`` always gets the detected format (``driver=`` of ``--image-opts``, the equivalent
of ``-f``) and both files through image options, so that no path string is ever parsed as a
protocol or ``json:``.  ``qemu-img info`` runs under resource
limits as a second opinion on our own inspector, and only after it (§C.17).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections import deque
from pathlib import Path
from typing import Any

from instance_cloudimage.disk.write import DiskTarget
from instance_cloudimage.image.formats import DetectedImage, DiskFormat, display_name
from instance_cloudimage.image.qemuinfo import ask_once
from instance_cloudimage.runtime.errors import CommandError, ConversionError, DiskTooSmall, UnsafeImage
from instance_cloudimage.runtime.log import Progress, format_size
from instance_cloudimage.runtime.process import Limits, child_environment, run_streaming, run_text

log = logging.getLogger(__name__)

INFO_LIMITS = Limits(address_space=1024**3, cpu_seconds=30)
# qemu-img convert reserves address space per thread; MALLOC_ARENA_MAX keeps it under 2 GiB.
CONVERT_LIMITS = Limits(address_space=2 * 1024**3)
CONVERT_ENV = {"MALLOC_ARENA_MAX": "3"}
VMDK_TYPES = ("monolithicSparse", "streamOptimized")
QEMU_PROGRESS = re.compile(r"\((\d{1,3}\.\d{2})/100%\)")


def opt(value: str) -> str:
    """An --image-opts value: commas must be doubled."""
    return value.replace(",", ",,")


def image_opts(fmt: DiskFormat, path: Path, size: int | None = None) -> str:
    opts = f"driver={fmt.value},file.driver=file,file.filename={opt(os.path.abspath(path))}"
    return opts + (f",size={size}" if size is not None else "")


def target_opts(target: DiskTarget) -> str:
    driver = "host_device" if target.is_block else "file"
    return f"driver=raw,file.driver={driver},file.filename={opt(target.path)}"


def target_size(path: str) -> int:
    """Size in bytes of a block device or regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def check_fits(virtual_size: int, target: DiskTarget) -> None:
    """Raise DiskTooSmall (naming both sizes) unless the image fits on the disk."""
    if virtual_size > target.size:
        raise DiskTooSmall(
            f"image virtual size {format_size(virtual_size)} ({virtual_size} bytes) is larger than "
            f"the disk, {format_size(target.size)} ({target.size} bytes)",
            "create the instance with a larger disk 0", needed=virtual_size,
        )


def inspect_with_qemu(path: Path, detected: DetectedImage, kept: Path | None = None) -> dict[str, Any]:
    """``qemu-img info`` with the detected format, under limits; refuse what our inspector missed.

    With ``kept`` (a directory), qemu-img is asked once per unchanged file (image/qemuinfo.py); the
    checks below run on its answer every time."""
    name = display_name(detected.format)

    def ask() -> dict[str, Any]:
        try:
            out = run_text(["qemu-img", "info", "--output=json", "--image-opts", image_opts(detected.format, path)],
                           limits=INFO_LIMITS, env=CONVERT_ENV, timeout=120)
        except CommandError as e:
            raise UnsafeImage(f"qemu-img cannot read the {name} image: {e.last_line}") from None
        try:
            answer = json.loads(out)
        except ValueError:
            raise UnsafeImage(f"qemu-img's description of the {name} image is not JSON") from None
        if not isinstance(answer, dict):
            raise UnsafeImage(f"qemu-img's description of the {name} image is not a JSON object")
        return answer

    info = ask_once(path, detected, kept, ask)
    if info.get("format") != detected.format.value:
        raise UnsafeImage(f"qemu-img reads the image as {info.get('format')}, our inspector as {name}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UnsafeImage("image has a backing file, which could copy host files into the instance")
    if info.get("encrypted"):
        raise UnsafeImage(f"{name} image is encrypted", "decrypt it first")
    if info.get("dirty-flag"):
        raise UnsafeImage(f"{name} image is marked dirty", "repair it with qemu-img check -r all")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise UnsafeImage("image uses an external data file, which could copy host files into the instance")
    if data.get("corrupt"):
        raise UnsafeImage(f"{name} image is marked corrupt")
    if detected.format is DiskFormat.VMDK:
        if data.get("create-type") not in VMDK_TYPES:
            raise UnsafeImage(f"qemu-img reads the VMDK as {str(data.get('create-type'))[:32]}")
        for extent in data.get("extents") or []:
            if extent.get("filename") != os.path.abspath(path):
                raise UnsafeImage("VMDK image has an extent outside the file, which could copy host files")
    if int(info.get("virtual-size", -1)) != detected.virtual_size:
        raise UnsafeImage(f"qemu-img and our inspector disagree about the {name} image's virtual size "
                          f"({info.get('virtual-size')} and {detected.virtual_size} bytes)")
    return info


def supports_direct_io(target: DiskTarget) -> bool:
    """O_DIRECT fails on tmpfs and some file systems; qemu-img -t none needs it."""
    try:
        fd = os.open(target.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def convert_file(source: Path, detected: DetectedImage, target: DiskTarget) -> None:
    """Write the image file ``source`` onto ``target`` with qemu-img convert.

    A random-access format must have passed inspect_file and inspect_with_qemu; raw data (also a
    fixed VHD's, limited to its data size) needs neither: ``driver=raw`` reads nothing else.
    """
    if detected.needs_qemu:
        fmt, size = detected.format, None
    else:
        fmt, size = DiskFormat.RAW, detected.raw_data_size
    cache = "none" if supports_direct_io(target) else "writeback"
    argv = ["qemu-img", "convert", "-n", "-p", "-t", cache, "-W", "-m", "16"]
    if target.known_zero:
        argv.append("--target-is-zero")
    argv += ["--image-opts", image_opts(fmt, source, size), "--target-image-opts", target_opts(target)]
    log.info("writing the %s image (%s virtual) with qemu-img", detected.details,
             format_size(detected.virtual_size))
    run_convert(argv, detected.virtual_size)


def run_convert(argv: list[str], virtual_size: int) -> None:
    """Run ``qemu-img convert -p``, its progress shown like our own writes'.  Raises ConversionError.

    -p prints ``(NN.NN/100%)`` lines ended by a carriage return on stdout, terminal or not; the
    percentage is of the virtual size.  Anything else it prints is an error message."""
    said: deque[str] = deque(maxlen=20)
    with Progress("converting image", virtual_size) as progress:

        def on_line(line: str) -> None:
            text = line.strip()
            if m := QEMU_PROGRESS.fullmatch(text):
                progress.advance_to(int(float(m.group(1)) * virtual_size / 100))
            elif text:
                said.append(text)

        result = run_streaming(argv, on_line, env=child_environment(CONVERT_ENV), limits=CONVERT_LIMITS,
                               split_cr=True)
        if result.returncode != 0:
            log.debug("qemu-img convert exited %d: %s", result.returncode, " | ".join(said))
            raise ConversionError(f"qemu-img convert failed: {said[-1] if said else f'exit code {result.returncode}'}")
