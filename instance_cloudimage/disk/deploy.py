"""Putting the image onto the instance's disk: unwrap, detect, then stream or convert.

The image arrives as an ImageStream (sources/fetch.py): ``peek``/``readinto``/``read``, then
``finish()``, which verifies the checksum of the fetched bytes and returns the verified file.

* Wrappers (gzip, xz, bzip2, zstd, tar) are peeled by content, up to MAX_LAYERS deep.
* Raw content (MBR, GPT, ISO, fixed VHD) streams through the decoders straight onto the disk,
  with no temporary copy; the checksum is verified at the end and a mismatch fails the create
  and scrubs the disk (it was scratch until then).  When the whole image is already a local
  file (``stream.local_path``, optional), it is verified first and copied by qemu-img, which
  skips holes at the disk's speed.
* Random-access formats (qcow2, vmdk, vdi, vhd, vhdx) are converted by qemu-img from the
  verified file; inside a wrapper they are first decompressed into a sparse spool file.  Our
  inspector vets the whole file, then qemu-img info, then qemu-img convert.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from instance_cloudimage.disk.convert import check_fits, convert_file, inspect_with_qemu
from instance_cloudimage.disk.write import (
    TRAILER,
    CopyResult,
    DiskTarget,
    copy_stream,
    fill,
    scrub,
    too_large,
    zero_range,
)
from instance_cloudimage.image.detect import HEAD_SIZE, check_tail, identify, inspect_file
from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DetectedImage, DiskFormat, Wrapper, display_name, normalize_declared
from instance_cloudimage.image.tar import TarMember
from instance_cloudimage.image.wrappers import Layer, Readable, announced_size, identify_wrapper, open_decoder
from instance_cloudimage.runtime.errors import DiskTooSmall, UnsafeImage, UnsupportedFormat
from instance_cloudimage.runtime.localpath import open_verified_file
from instance_cloudimage.runtime.log import format_size

log = logging.getLogger(__name__)

MAX_LAYERS = 4


class ImageStream(Protocol):
    """What deploy needs from source.ImageStream."""

    size: int | None

    def peek(self, n: int) -> bytes: ...

    def read(self, n: int = ...) -> bytes: ...

    def readinto(self, buf: bytearray | memoryview) -> int: ...

    def finish(self) -> Any: ...


@dataclass(frozen=True)
class Deployed:
    detected: DetectedImage
    wrappers: tuple[Wrapper, ...]
    written: int | None  # data bytes we wrote ourselves (None when qemu-img wrote)


class Peeked(Layer):
    """A layer whose first bytes were read for detection and are served again."""

    def __init__(self, inner: Layer) -> None:
        self.inner = inner
        self.what = inner.what
        buf = bytearray(HEAD_SIZE)
        self.head = bytes(buf[:fill(inner, memoryview(buf))])
        self.offset = 0

    def readinto(self, buf: bytearray | memoryview) -> int:
        if self.offset < len(self.head):
            n = min(len(buf), len(self.head) - self.offset)
            memoryview(buf)[:n] = self.head[self.offset:self.offset + n]
            self.offset += n
            return n
        return self.inner.readinto(buf)

    def finish(self) -> None:
        self.inner.finish()

    def close(self) -> None:
        self.inner.close()


def check_declared(declared: DiskFormat | None, detected: DetectedImage) -> None:
    """A declared format narrows detection, never overrides it."""
    if declared is None or declared is detected.format:
        return
    if declared is DiskFormat.RAW and detected.raw_data_size is not None:
        return  # a fixed VHD is raw data with a footer
    raise UnsafeImage(f"image was declared as {display_name(declared)} but its content is {detected.details}",
                      "fix the variant's [Image] Format")


def spool_limit(target: DiskTarget) -> int:
    # A qcow2/vmdk file may be a little larger than its virtual size (metadata).
    return target.size + target.size // 8 + 64 * 1024 * 1024


@dataclass
class Unwrapped:
    source: Readable  # the innermost content
    head: bytes  # its first HEAD_SIZE bytes
    layers: list[Layer]  # outermost first
    wrappers: list[Wrapper]
    announced: int | None  # the content's size as the innermost wrapper announces it


def unwrap(stream: ImageStream, stack: ExitStack) -> Unwrapped:
    """Peel the wrappers, identified by their magic bytes, off the stream."""
    head = stream.peek(HEAD_SIZE)
    local = getattr(stream, "local_path", None)
    source: Readable = stream
    layers: list[Layer] = []
    wrappers: list[Wrapper] = []
    announced: int | None = None
    while (wrapper := identify_wrapper(head)) is not None:
        if len(layers) == MAX_LAYERS:
            raise UnsupportedFormat(f"image is wrapped in more than {MAX_LAYERS} layers of compression")
        layer: Layer
        if wrapper is Wrapper.TAR:
            layer = TarMember(source)
            announced = layer.size
        else:
            announced = announced_size(wrapper, head, local if not layers else None)
            layer = open_decoder(wrapper, source, f"{wrapper.value}-compressed image")
        stack.callback(layer.close)
        peeked = Peeked(layer)
        layers.append(peeked)
        wrappers.append(wrapper)
        source, head = peeked, peeked.head
    return Unwrapped(source, head, layers, wrappers, announced)


def check_announced(size: int | None, found: DetectedImage, target: DiskTarget) -> None:
    """Refuse a bomb before writing: the sizes wrappers announce are lower bounds (or exact, for
    tar).  Only a hint: the writer enforces the cap on the bytes really decompressed."""
    limit = spool_limit(target) if found.format is not DiskFormat.RAW else target.size + TRAILER
    if size is not None and size > limit:
        raise DiskTooSmall(f"image announces {format_size(size)} ({size} bytes) once decompressed, more than "
                           f"the disk, {format_size(target.size)} ({target.size} bytes)",
                           "create the instance with a larger disk 0", needed=size)


def finish_layers(stream: ImageStream, layers: list[Layer]) -> Path:
    """Innermost first: each layer checks it ended well; then the checksum is verified."""
    for layer in reversed(layers):
        layer.finish()
    return Path(stream.finish().path)


def shown_size(inner: Unwrapped) -> int | None:
    """The decompressed size to show progress against: what the innermost wrapper announces (an
    xz index, a zstd frame header, a tar member's size), but never gzip's, which is the size
    modulo 4 GiB.  Only for display; check_announced and the writer's cap do the refusing."""
    if not inner.wrappers or inner.wrappers[-1] is Wrapper.GZIP:
        return None
    return inner.announced


def stream_raw(stream: ImageStream, source: Readable, layers: list[Layer], found: DetectedImage,
               declared: DiskFormat | None, target: DiskTarget, shown: int | None = None) -> Deployed:
    total = stream.size if not layers else None
    if total is not None and total > target.size + TRAILER:
        raise too_large(total, target)
    try:
        result = copy_stream(source, target, total=total if total is not None else shown)
        finish_layers(stream, layers)
        detected = raw_result(result, target, found.details)
        check_declared(declared, detected)
    except BaseException:
        scrub(target)
        raise
    return Deployed(detected, (), result.written)


def raw_result(result: CopyResult, target: DiskTarget, details: str) -> DetectedImage:
    """What a streamed raw image turned out to be, once its tail was seen."""
    total = result.size + result.overflow
    data_size = check_tail(result.tail, total)
    if data_size is None:
        if result.overflow:
            raise too_large(total, target)
        return DetectedImage(DiskFormat.RAW, total, details)
    zero_range(target, data_size, min(total, target.size) - data_size)  # the footer is not disk data
    os.fsync(target.fd)
    return DetectedImage(DiskFormat.VPC, data_size, "vhd (fixed)", raw_data_size=data_size)


def spool(source: Readable, target: DiskTarget, spool_dir: Path, stack: ExitStack, shown: int | None = None) -> Path:
    """Decompress into a private sparse file, capped a little above the disk's size."""
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(dir=spool_dir, prefix="spool-", suffix=".img")
    path = Path(name)
    stack.callback(lambda: path.unlink(missing_ok=True))
    stack.callback(os.close, fd)
    spooled = DiskTarget(name, fd, spool_limit(target), False, True, grows=True,
                         role="the spool limit (the disk's size plus one eighth)")
    log.info("decompressing into a spool file (the format needs random access)")
    copy_stream(source, spooled, total=shown)
    return path


def write_from_file(path: Path, declared: DiskFormat | None, target: DiskTarget,
                    kept: Path | None = None) -> DetectedImage:
    """Vet the whole verified file (our inspector, then qemu-img info, its answer kept in ``kept``
    per file), then qemu-img convert it."""
    fd = open_verified_file(path)
    try:
        detected = inspect_file(ImageFile(fd))
    finally:
        os.close(fd)
    check_declared(declared, detected)
    check_fits(detected.virtual_size, target)
    if detected.needs_qemu:
        inspect_with_qemu(path, detected, kept)
    convert_file(path, detected, target)
    return detected


def deploy_image(stream: ImageStream, declared: str, target: DiskTarget, spool_dir: Path,
                 stack: ExitStack,
                 before_write: Callable[[DetectedImage, Path | None], None] | None = None,
                 kept: Path | None = None) -> Deployed:
    """Write the image in ``stream`` onto ``target``.  Raises a UserError on any refusal.

    ``before_write(detected, file_or_None)`` runs after detection and the checks that can be
    made from the head, before the first byte reaches the disk (the pre-write hooks); the file
    is the verified, unwrapped image when one exists, None when raw content is streamed.
    ``kept`` is where
    qemu-img's answers about stable image files (cache entries, local files used in place) are
    kept (image/qemuinfo.py); a spool or a private copy is new every time and asks afresh.
    """
    declared_fmt = None if declared == "auto" else normalize_declared(declared)
    inner = unwrap(stream, stack)
    found = identify(inner.head)
    check_announced(inner.announced, found, target)
    log.info("image content: %s%s", found.details, "".join(f" in {w.value}" for w in reversed(inner.wrappers)))
    if found.format is DiskFormat.RAW and declared_fmt not in (None, DiskFormat.RAW, DiskFormat.VPC):
        check_declared(declared_fmt, found)  # refuse before writing; a fixed VHD shows at the end
    elif found.format is not DiskFormat.RAW:
        check_declared(declared_fmt, found)
    wrappers = tuple(inner.wrappers)
    local = getattr(stream, "local_path", None) is not None
    if found.format is DiskFormat.RAW and (inner.layers or not local):
        if before_write is not None:
            before_write(found, None)  # streamed: there is no whole file yet
        done = stream_raw(stream, inner.source, inner.layers, found, declared_fmt, target, shown_size(inner))
        return Deployed(done.detected, wrappers, done.written)
    if inner.layers:
        path = spool(inner.source, target, spool_dir, stack, shown_size(inner))
        finish_layers(stream, inner.layers)
    else:
        path = Path(stream.finish().path)
    if before_write is not None:
        before_write(found, path)  # verified (and unwrapped); the disk is not touched yet
    return Deployed(write_from_file(path, declared_fmt, target, kept=kept if local and not inner.layers else None),
                    wrappers, None)
