"""Properties of the header inspectors (qcow2, VMDK, VHD, VHDX, VDI) on hostile bytes.

For any file, ``inspect_file`` either returns a DetectedImage or refuses with a UserError
(UnsafeImage, UnsupportedFormat), never another exception; every byte it reads lies inside the
file; and the conftest profile's per-example deadline keeps its time bounded.  Besides arbitrary
bytes, valid images written by qemu-img are mutated (bytes overwritten, the file cut short), which
reaches the table walks that random bytes never get past the magic to.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from instance_cloudimage.image import vmdk
from instance_cloudimage.image.detect import inspect_file
from instance_cloudimage.image.file import ImageFile
from instance_cloudimage.image.formats import DetectedImage
from instance_cloudimage.runtime.errors import UnsafeImage, UserError
from tests.conftest import need_tools


class CheckedImage(ImageFile):
    """An ImageFile that records every read, optionally over a mutated, shortened copy of a file."""

    def __init__(self, fd: int, size: int | None = None, patches: dict[int, int] | None = None) -> None:
        super().__init__(fd)
        if size is not None:
            self.size = min(size, self.size)
        self.patches = patches or {}
        self.bytes_read = 0

    def read_at(self, offset: int, length: int) -> bytes:
        data = super().read_at(offset, length)
        assert 0 <= offset and offset + len(data) <= self.size, "read outside the file"
        self.bytes_read += len(data)
        if self.patches:
            buf = bytearray(data)
            for at, value in self.patches.items():
                if offset <= at < offset + len(buf):
                    buf[at - offset] = value
            data = bytes(buf)
        return data


def memfile(data: bytes) -> int:
    fd = os.memfd_create("image")
    os.write(fd, data)
    return fd


def check(img: CheckedImage) -> None:
    try:
        found = inspect_file(img)
    except UserError:
        return
    assert isinstance(found, DetectedImage)


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_inspected_or_refused(data: bytes) -> None:
    fd = memfile(data)
    try:
        check(CheckedImage(fd))
    finally:
        os.close(fd)


# Arbitrary bytes behind each magic the detector knows, so every inspector is entered.
MAGICS = [b"QFI\xfb\0\0\0\x02", b"QFI\xfb\0\0\0\x03", b"KDMV\x01\0\0\0", b"conectix", b"vhdxfile",
          bytes(0x40) + b"\x7f\x10\xda\xbe"]


@given(st.sampled_from(MAGICS), st.binary(max_size=8192))
def test_bytes_behind_a_magic_are_inspected_or_refused(magic: bytes, rest: bytes) -> None:
    fd = memfile(magic + rest)
    try:
        check(CheckedImage(fd))
    finally:
        os.close(fd)


# --- mutations of valid images ------------------------------------------------------------------

SAMPLES = {
    "qcow2": ["-O", "qcow2"],
    "qcow2-compressed": ["-O", "qcow2", "-c"],
    "qcow2-extended-l2": ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=64k"],
    "vmdk": ["-O", "vmdk"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vpc": ["-O", "vpc"],
    "vpc-fixed": ["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
    "vhdx": ["-O", "vhdx"],
    "vdi": ["-O", "vdi"],
}


@functools.cache
def sample_dir() -> Path:
    """Valid images of 1 MiB holding a few data blocks, made once per session with qemu-img."""
    need_tools("qemu-img")
    work = Path(tempfile.mkdtemp(prefix="inspect-props-"))
    raw = bytearray(1 << 20)
    for i in range(0, len(raw), 3 * 65536):
        raw[i:i + 4096] = bytes((i // 4096 + j) % 251 + 1 for j in range(4096))
    (work / "raw").write_bytes(raw)
    for name, options in SAMPLES.items():
        subprocess.run(["qemu-img", "convert", "-f", "raw", *options, str(work / "raw"), str(work / name)],
                       check=True, capture_output=True)
    return work


@functools.cache
def sample_fd(name: str) -> int:
    """An open descriptor on a sample (kept for the session; the mutations never write it)."""
    return os.open(sample_dir() / name, os.O_RDONLY)


def test_the_valid_samples_are_accepted() -> None:
    for name in SAMPLES:
        img = CheckedImage(sample_fd(name))
        found = inspect_file(img)
        assert found.virtual_size >= 1 << 20, name
        # Bounded work: an inspector reads at most its file, plus one block per table it revisits.
        assert img.bytes_read <= img.size + (1 << 20), name


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, int | None, dict[int, int]]:
    name = draw(st.sampled_from(sorted(SAMPLES)))
    size = os.fstat(sample_fd(name)).st_size
    # Headers and tables sit at the start, in the first MiBs (VHDX regions) or at the end
    # (footers): mutate around all three.
    where = st.one_of(st.integers(0, 4095), st.integers(0, min(size, 4 << 20) - 1),
                      st.integers(max(0, size - 2048), size - 1))
    patches = draw(st.dictionaries(where, st.integers(0, 255), min_size=1, max_size=8))
    cut = draw(st.none() | st.integers(0, size))
    return name, cut, patches


@given(mutations())
def test_mutated_images_are_inspected_or_refused(case: tuple[str, int | None, dict[int, int]]) -> None:
    name, cut, patches = case
    img = CheckedImage(sample_fd(name), cut, patches)
    check(img)
    assert img.bytes_read <= img.size + (1 << 20) * 4


# --- regressions found by the properties ------------------------------------------------------

def test_a_vmdk_extent_with_a_huge_sector_count_is_refused() -> None:
    # int() refuses more than 4300 digits with ValueError; the descriptor must refuse the line.
    with pytest.raises(UnsafeImage, match="descriptor line"):
        vmdk.parse_descriptor('createType="monolithicSparse"\nRW ' + "1" * 5000 + ' SPARSE "x.vmdk"\n')


@example('RW \u0661\u0662 SPARSE "x.vmdk"')
@given(st.text(max_size=200))
def test_vmdk_descriptor_lines_are_parsed_or_refused(line: str) -> None:
    try:
        vmdk.parse_descriptor('createType="monolithicSparse"\n' + line)
    except UserError:
        pass


def test_an_extended_l2_qcow2_whose_last_cluster_is_partly_written_is_accepted() -> None:
    # qemu-img writes a cluster only up to its last allocated subcluster, so a valid image may end
    # inside a cluster it maps; only the allocated subclusters must lie inside the file.
    img = CheckedImage(sample_fd("qcow2-extended-l2"))
    assert img.size % (64 * 1024)
    assert inspect_file(img).virtual_size == 1 << 20
    cut = CheckedImage(sample_fd("qcow2-extended-l2"), img.size - 1)
    with pytest.raises(UnsafeImage, match="truncated"):
        inspect_file(cut)
