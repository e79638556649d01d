"""Properties of the streamed tar reader on hostile bytes.

For any byte stream, opening the disk member, reading it to its end and ``finish`` either succeed
or refuse with a UserError (UnsafeImage, UnsupportedFormat, or ConversionError for data after the
archive), never another exception; the member yields exactly the size it announced; and the
conftest profile's per-example deadline keeps the time bounded.  Valid archives (ustar, GNU, PAX,
and GNU tar's two sparse formats) are mutated as well as arbitrary bytes tried.
"""

from __future__ import annotations

import functools
import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from instance_cloudimage.image.tar import TarMember, parse_decimal
from instance_cloudimage.runtime.errors import UnsafeImage, UserError
from tests.conftest import need_tools
from tests.support.imagetools import Source

MAX_CONTENT = 16 << 20  # holes are zeros to read, not work the parser does: keep the deadline honest


def read_archive(data: bytes, step: int = 1 << 20) -> bytes | None:
    """The disk member's content, or None when the archive is refused."""
    try:
        member = TarMember(Source(data, step))
        if member.size > MAX_CONTENT:  # a mutated sparse map may announce gigabytes of holes
            member.read(1 << 16)
            return None
        out = bytearray()
        while chunk := member.read(1 << 16):
            out += chunk
        assert len(out) == member.size
        member.finish()
    except UserError:
        return None
    return bytes(out)


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_read_or_refused(data: bytes) -> None:
    read_archive(data)


DISK = bytes(range(256)) * 8 + bytes(4096) + b"tail" * 100


def build(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("box.ovf")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"<ovf>"))
        name = "disk.img" if fmt == tarfile.USTAR_FORMAT else "d" * 120 + "/disk-\u00e9.img"
        info = tarfile.TarInfo(name)
        info.size = len(DISK)
        tar.addfile(info, io.BytesIO(DISK))
    return buf.getvalue()


@functools.cache
def samples() -> dict[str, bytes]:
    """Valid archives holding DISK: tarfile's three formats and GNU tar's sparse ones."""
    out = {"ustar": build(tarfile.USTAR_FORMAT), "gnu": build(tarfile.GNU_FORMAT), "pax": build(tarfile.PAX_FORMAT)}
    need_tools("tar")
    work = Path(tempfile.mkdtemp(prefix="tar-props-"))
    with open(work / "disk.raw", "wb") as f:
        f.write(DISK)
        f.seek(256 * 1024)
        f.write(b"after a hole")
    for fmt in ("oldgnu", "pax"):
        subprocess.run(["tar", f"--format={fmt}", "-S", "-cf", str(work / f"{fmt}.tar"), "-C", str(work), "disk.raw"],
                       check=True, capture_output=True)
        out[f"sparse-{fmt}"] = (work / f"{fmt}.tar").read_bytes()
    return out


def test_the_valid_samples_are_read() -> None:
    for name, data in samples().items():
        content = read_archive(data, step=4096)
        assert content is not None, name
        assert content.startswith(DISK), name


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, int]:
    data = bytearray(samples()[draw(st.sampled_from(sorted(samples())))])
    # Headers, PAX records and sparse maps are in the first blocks; mutate there mostly.
    where = st.one_of(st.integers(0, min(len(data), 2048) - 1), st.integers(0, len(data) - 1))
    for at, value in draw(st.dictionaries(where, st.integers(0, 255), min_size=1, max_size=8)).items():
        data[at] = value
    cut = draw(st.integers(0, len(data)))
    if draw(st.booleans()):
        data = data[:cut]
    return bytes(data), draw(st.sampled_from([1, 7, 512, 1 << 20]))


@given(mutations())
def test_mutated_archives_are_read_or_refused(case: tuple[bytes, int]) -> None:
    data, step = case
    read_archive(data, step)


# --- regressions found by the properties ------------------------------------------------------

@example("\u00b2")
@example("1" * 5000)
@given(st.text(max_size=64))
def test_pax_decimals_are_parsed_or_refused(text: str) -> None:
    try:
        assert parse_decimal(text) >= 0
    except UnsafeImage:
        pass


@pytest.mark.parametrize("value", ["\u00b2", "\u0661", "1" * 5000])
def test_a_pax_size_that_int_refuses_is_refused(value: str) -> None:
    record = f" size={value}\n".encode()
    record = str(len(record) + len(str(len(record)))).encode() + record
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("././@PaxHeader")
        info.type = tarfile.XHDTYPE
        info.size = len(record)
        tar.addfile(info, io.BytesIO(record))
        info = tarfile.TarInfo("disk.img")
        info.size = 512
        tar.addfile(info, io.BytesIO(bytes(512)))
    with pytest.raises(UnsafeImage, match="malformed PAX header"):
        TarMember(Source(buf.getvalue(), 1 << 20))


def test_reading_one_byte_at_a_time_is_the_same() -> None:
    assert read_archive(samples()["pax"], step=1) == read_archive(samples()["pax"])
