"""What a streamed write shows its progress against: the size an xz index or a tar header
announces, never gzip's (the size modulo 4 GiB).  Progress is recorded at its seam."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import tarfile
from pathlib import Path

import pytest

from instance_cloudimage.disk import write
from instance_cloudimage.runtime.log import Progress
from tests.support.imagetools import MiB, deploy, new_disk


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
    disk = new_disk(tmp_path / "disk.img", 8 * MiB)
    deploy(image, disk, local=True, spool=tmp_path / "spool")
    assert totals == [("writing image", len(data) if shown else None)]
    assert disk.read_bytes()[:len(data)] == data
