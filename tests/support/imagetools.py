"""Helpers for the image-format tests: small real images built with standard tools, a stream
implementing the ImageStream protocol over a file, and loop devices."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instance_cloudimage.disk.deploy import Deployed, deploy_image
from instance_cloudimage.disk.write import open_disk
from instance_cloudimage.runtime.errors import ChecksumMismatch, ImageFetchError

MiB = 1024 * 1024
SECRET = b"TOP-SECRET-HOST-DATA-0123456789"


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """The tests' one subprocess call (the package itself uses process.run)."""
    return subprocess.run(argv, **kwargs)


def sh(*argv: str | os.PathLike[str], input: bytes | None = None) -> bytes:
    out: bytes = run([os.fspath(a) for a in argv], input=input, check=True, capture_output=True).stdout
    return out


def make_raw_disk(path: Path, size: int = 32 * MiB, seed: int = 1) -> Path:
    """A GPT disk with a partition, random and compressible data, and holes between them."""
    with open(path, "wb") as f:
        f.truncate(size)
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path,
       input=b"label: gpt\nstart=2048, size=20480, type=L\nstart=22528, type=L\n")
    rnd = hashlib.shake_256(str(seed).encode()).digest(3 * MiB)
    text = b"".join(b"line %d of compressible data\n" % i for i in range(60000))
    with open(path, "r+b") as f:
        for offset, data in ((1 * MiB + 4096, rnd), (9 * MiB + 512, text), (size // 2 + 3, rnd[:700000]),
                             (size - 4 * MiB - 100, b"\xff" * 5000)):
            f.seek(offset)
            f.write(data)
    return path


def qemu_convert(src: Path, dst: Path, fmt: str, *options: str) -> Path:
    if dst.exists():  # test modules build each image once
        return dst
    sh("qemu-img", "convert", "-f", "raw", "-O", fmt, *options, src, dst)
    return dst


@dataclass
class Fetched:
    path: Path
    size: int


class FileStream:
    """The ImageStream protocol over a local file (what sources/fetch.py provides), with an optional
    sha256 to verify in finish() and an optional ``local_path``."""

    def __init__(self, path: Path, *, sha256: str | None = None, local: bool = False) -> None:
        self.path = path
        self.file = open(path, "rb")
        self.size: int | None = os.fstat(self.file.fileno()).st_size
        self.expected = sha256
        self.hash = hashlib.sha256()
        self.local_path = path if local else None
        self.finished = False

    def peek(self, n: int) -> bytes:
        return os.pread(self.file.fileno(), n, self.file.tell())

    def readinto(self, buf: bytearray | memoryview) -> int:
        n = self.file.readinto(buf)
        self.hash.update(memoryview(buf)[:n])
        return n

    def read(self, n: int = 4 * MiB) -> bytes:
        data = self.file.read(n)
        self.hash.update(data)
        return data

    def finish(self) -> Fetched:
        while self.read():
            pass
        self.finished = True
        self.file.close()
        if self.expected and self.hash.hexdigest() != self.expected:
            raise ChecksumMismatch("the image does not match its sha256 checksum")
        return Fetched(self.path, self.path.stat().st_size)


def deploy(image: Path, disk: Path | str, *, declared: str = "auto", local: bool = False,
           sha256: str | None = None, wiped: bool = False, spool: Path | None = None) -> Deployed:
    stream = FileStream(image, sha256=sha256, local=local)
    with ExitStack() as stack:
        target = open_disk(os.fspath(disk), wiped=wiped, stack=stack)
        return deploy_image(stream, declared, target, spool or image.parent / "spool", stack)


def new_disk(path: Path, size: int = 32 * MiB, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return path


def compare(disk: Path | str, raw: Path) -> None:
    """qemu-img compare the disk (read as raw) with the source's raw view; raises on difference."""
    out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", os.fspath(disk), os.fspath(raw)],
              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert out.returncode == 0, out.stdout.decode()


def nonzero_chunk_bytes(path: Path, chunk: int = 4 * MiB) -> int:
    """Bytes in the ``chunk``-sized pieces of ``path`` that are not all zero."""
    total = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            if data.count(0) != len(data):
                total += len(data)
    return total


def contains(path: Path | str, needle: bytes) -> bool:
    with open(path, "rb") as f:
        carry = b""
        while chunk := f.read(4 * MiB):
            if needle in carry + chunk:
                return True
            carry = chunk[-len(needle):]
    return False


@contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    dev = sh("losetup", "--find", "--show", backing).decode().strip()
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev], check=False)


def root() -> bool:
    return os.geteuid() == 0


class Source:
    """A Readable over bytes that hands out at most ``step`` bytes per call, like a pipe; raises
    a download error once ``fail_at`` bytes were read."""

    def __init__(self, data: bytes, step: int = 100_000, fail_at: int | None = None) -> None:
        self.data = io.BytesIO(data)
        self.step = step
        self.fail_at = fail_at

    def readinto(self, buf: bytearray | memoryview) -> int:
        if self.fail_at is not None and self.data.tell() >= self.fail_at:
            raise ImageFetchError("the download of the image failed: connection reset")
        view = memoryview(buf)[:self.step]
        return self.data.readinto(view)

    def read(self, n: int = -1) -> bytes:
        return self.data.read(min(n, self.step) if n >= 0 else self.step)
