"""Properties of the export stream reader on hostile bytes.

For any header and body, ``parse_header`` and ``read_records`` either succeed or raise StreamError
(a ConversionError, so a UserError), never another exception; every piece handed to ``on_data``
lies inside the disk, in ascending order; and the conftest profile's per-example deadline keeps the
time bounded.  Streams written by ``write_stream`` (plain and zstd) are mutated as well.
"""

from __future__ import annotations

import functools
import io
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from instance_cloudimage.disk import exportstream as ds
from instance_cloudimage.disk import importstream as ims
from instance_cloudimage.runtime.errors import UserError

DISK_SIZE = 256 * 1024


def replay(stream: bytes, max_size: int = 1 << 30) -> int | None:
    """The data bytes of a stream, or None when it is refused; checks every on_data call."""
    pos = 0

    def on_data(offset: int, data: bytes) -> None:
        nonlocal pos
        assert pos <= offset and offset + len(data) <= header.disk_size
        pos = offset + len(data)

    try:
        header = ims.parse_header(stream[:ds.HEADER.size])
        return ims.read_records(ims.Reader(io.BytesIO(stream[ds.HEADER.size:]), header.compressed),
                               header, max_size, on_data)
    except UserError:
        return None


@given(st.binary(max_size=64))
def test_arbitrary_headers_are_parsed_or_refused(data: bytes) -> None:
    try:
        header = ims.parse_header(data)
    except ims.StreamError:
        return
    assert len(data) == ds.HEADER.size and header.version == ds.VERSION


@given(st.sampled_from([0, ds.FLAG_ZSTD]), st.integers(0, 1 << 40), st.binary(max_size=2048))
def test_arbitrary_bodies_are_read_or_refused(flags: int, disk_size: int, body: bytes) -> None:
    replay(ds.HEADER.pack(ds.MAGIC, ds.VERSION, flags, 0, disk_size) + body)


@functools.cache
def samples() -> dict[str, bytes]:
    fd = os.memfd_create("disk")
    try:
        os.ftruncate(fd, DISK_SIZE)
        for at in (0, 8192, 98_304, DISK_SIZE - 4096):
            os.pwrite(fd, bytes((at + i) % 253 + 1 for i in range(4096)), at)
        out = {}
        for name, level in (("plain", None), ("zstd", 3)):
            sink = io.BytesIO()
            ds.write_stream(fd, DISK_SIZE, sink, zstd_level=level)
            out[name] = sink.getvalue()
        return out
    finally:
        os.close(fd)


def test_the_valid_samples_are_read() -> None:
    for name, stream in samples().items():
        assert replay(stream) == 4 * 4096, name


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(samples()[draw(st.sampled_from(sorted(samples())))])
    where = st.one_of(st.integers(0, 63), st.integers(0, len(data) - 1))
    for at, value in draw(st.dictionaries(where, st.integers(0, 255), min_size=1, max_size=6)).items():
        data[at] = value
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


@given(mutations())
def test_mutated_streams_are_read_or_refused(stream: bytes) -> None:
    replay(stream)


@pytest.mark.parametrize("length", [0, 1, 23, 25])
def test_a_header_of_the_wrong_length_is_refused(length: int) -> None:
    # struct.error escaped parse_header for anything but 24 bytes.
    with pytest.raises(ims.StreamError, match="truncated"):
        ims.parse_header(ds.MAGIC.ljust(length, b"\0")[:length])
