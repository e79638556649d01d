"""What a streamed write shows its progress against: the size an xz index or a tar header
announces, never gzip's (the size modulo 4 GiB).  Progress is recorded at its seam."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import tarfile
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from instance_cloudimage.disk import write
from instance_cloudimage.disk.deploy import deploy_image
from instance_cloudimage.disk.write import open_disk
from instance_cloudimage.runtime.log import Progress

MiB = 1024 * 1024


class FileStream:
    """What sources/fetch.py hands deploy for a verified local file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.local_path = path
        self.size = path.stat().st_size
        self.f = open(path, "rb")

    def peek(self, n: int) -> bytes:
        pos = self.f.tell()
        data = self.f.read(n)
        self.f.seek(pos)
        return data

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def readinto(self, buf: bytearray | memoryview) -> int:
        return self.f.readinto(buf)

    def finish(self) -> Any:
        self.f.close()
        return SimpleNamespace(path=self.path)


def raw_image() -> bytes:
    mbr = bytearray(512)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr) + os.urandom(MiB) + bytes(3 * MiB)


def wrapped(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    if kind == "gzip":
        return gzip.compress(data)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("disk.raw")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(("kind", "shown"), [("xz", True), ("tar", True), ("gzip", False)])
def test_a_wrapped_raw_image_shows_the_announced_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      kind: str, shown: bool) -> None:
    totals: list[tuple[str, int | None]] = []

    class Recorded(Progress):
        def __init__(self, what: str, total: int | None, interval: float | None = None) -> None:
            totals.append((what, total))
            super().__init__(what, total, interval)

    monkeypatch.setattr(write, "Progress", Recorded)
    data = raw_image()
    image = tmp_path / f"disk.{kind}"
    image.write_bytes(wrapped(kind, data))
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    with ExitStack() as stack:
        target = open_disk(os.fspath(disk), wiped=False, stack=stack)
        deploy_image(FileStream(image), "auto", target, tmp_path / "spool", stack)
    assert totals == [("writing image", len(data) if shown else None)]
    assert disk.read_bytes()[:len(data)] == data
