"""Unit tests of the stream's building blocks: data extents, zero blocks, the writer's gaps, rename."""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path

import pytest

from instance_cloudimage.disk import exportstream as ds
from instance_cloudimage.disk import importstream as ims
from instance_cloudimage.disk.sparse import DiskWriter
from instance_cloudimage.ganeti.env import Script, parse_environment
from instance_cloudimage.ganeti.simulate import simulated_environment
from instance_cloudimage.runtime.errors import SeedError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.verbs.rename import run_rename

MIB = 1024 * 1024


def test_data_extents_of_a_sparse_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(MIB)
        f.write(b"x" * 4096)
        f.seek(8 * MIB)
        f.write(b"y" * (2 * MIB))
    fd = os.open(p, os.O_RDONLY)
    try:
        extents = list(ds.data_extents(fd, 16 * MIB))
        estimate = ds.estimate_stream_size(fd, 16 * MIB)
    finally:
        os.close(fd)
    covered = [(a, a + n) for a, n in extents]
    assert any(a <= MIB and MIB + 4096 <= b for a, b in covered)
    assert any(a <= 8 * MIB and 10 * MIB <= b for a, b in covered)
    assert sum(n for _, n in extents) < 4 * MIB  # the holes are not reported
    assert 2 * MIB + 4096 < estimate < 4 * MIB


def test_data_extents_of_an_empty_sparse_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(4 * MIB)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert list(ds.data_extents(fd, 4 * MIB)) == []
    finally:
        os.close(fd)


def reference_runs(data: bytes) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in range(0, len(data), ds.BLOCK):
        if any(data[i:i + ds.BLOCK]):
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], min(i + ds.BLOCK, len(data)))
            else:
                runs.append((i, min(i + ds.BLOCK, len(data))))
    return runs


@pytest.mark.parametrize("seed", range(8))
def test_nonzero_runs_match_a_reference(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([ds.CHUNK, ds.CHUNK - 1000, 5 * ds.BLOCK + 17, ds.BLOCK])
    buf = bytearray(ds.CHUNK)
    for _ in range(rng.randrange(0, 40)):
        pos = rng.randrange(n)
        buf[pos] = rng.randrange(1, 256)
    assert list(ds.nonzero_runs(buf, n)) == reference_runs(bytes(buf[:n]))


def test_nonzero_runs_all_zero_and_all_data() -> None:
    assert list(ds.nonzero_runs(bytearray(ds.CHUNK), ds.CHUNK)) == []
    assert list(ds.nonzero_runs(bytearray(b"\1" * ds.CHUNK), ds.CHUNK)) == [(0, ds.CHUNK)]


def test_write_stream_in_memory_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "disk"
    content = bytearray(8 * MIB)
    content[0:10] = b"0123456789"
    content[5 * MIB:5 * MIB + 70000] = os.urandom(70000)
    p.write_bytes(content)
    sink = io.BytesIO()
    fd = os.open(p, os.O_RDONLY)
    try:
        stats = ds.write_stream(fd, len(content), sink)
    finally:
        os.close(fd)
    assert stats.data_bytes == 4096 + 73728 and stats.records == 2 and stats.stream_bytes == len(sink.getvalue())
    got = bytearray(len(content))

    def on_data(offset: int, data: bytes) -> None:
        got[offset:offset + len(data)] = data

    src = io.BytesIO(sink.getvalue())
    header = ims.parse_header(src.read(ds.HEADER.size))
    assert ims.read_records(ims.Reader(src, header.compressed), header, len(content), on_data) == stats.data_bytes
    assert got == content


def test_looks_damaged() -> None:
    assert ims.looks_damaged(b"\x09CIDISK\n" + bytes(16))
    assert ims.looks_damaged(b"\x89CIDISX\n" + bytes(16))
    assert not ims.looks_damaged(b"\xeb\x63\x90" + bytes(21))  # a boot sector
    assert not ims.looks_damaged(bytes(24))
    assert not ims.looks_damaged(b"\x89CI")


def test_writer_zeroes_gaps_of_a_dirty_file(tmp_path: Path) -> None:
    p = tmp_path / "t"
    p.write_bytes(b"\xa5" * (2 * MIB))
    with DiskWriter(os.fspath(p)) as w:
        assert not w.known_zero and not w.is_block
        w.zero(100, MIB)
        w.write(MIB + 100, b"data")
    data = p.read_bytes()
    assert data[:100] == b"\xa5" * 100 and data[100:MIB + 100] == bytes(MIB) and data[MIB + 100:MIB + 104] == b"data"
    assert w.zeroed_by_writing < 8192  # only the unaligned edges around the punched hole


def test_writer_knows_a_fresh_sparse_file_is_zero(tmp_path: Path) -> None:
    p = tmp_path / "t"
    with open(p, "wb") as f:
        f.truncate(4 * MIB)
    with DiskWriter(os.fspath(p)) as w:
        assert w.known_zero
        w.zero(0, 4 * MIB)
    assert os.stat(p).st_blocks == 0


def rename_env(tmp_path: Path) -> dict[str, str]:
    disk = tmp_path / "d"
    disk.write_bytes(b"")
    return simulated_environment("demo", [disk], instance_name="new.example", old_name="old.example")


def test_rename_step_failures_are_only_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    genv = parse_environment(rename_env(tmp_path), Script.RENAME)
    done: list[str] = []

    def broken_user(genv: object, site: object) -> None:
        raise SeedError("no seed found on the disk")

    def broken_bug(genv: object, site: object) -> None:
        raise KeyError("oops")

    def fine(genv: object, site: object) -> None:
        done.append("fine")

    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        run_rename(genv, SiteConfig(), steps=[("update the seed", broken_user), ("do a thing", broken_bug),
                                               ("finish", fine)])
    assert done == ["fine"]
    assert "could not update the seed (left unchanged): no seed found" in caplog.text
    assert "could not do a thing (left unchanged): KeyError" in caplog.text
    assert "renamed old.example to new.example" in caplog.text


def stream_bytes(tmp_path: Path, zstd_level: int | None) -> tuple[bytes, bytes]:
    """(the disk, its export stream)."""
    p = tmp_path / "disk"
    content = bytes(MIB) + os.urandom(70000) + bytes(MIB)
    p.write_bytes(content)
    sink = io.BytesIO()
    fd = os.open(p, os.O_RDONLY)
    try:
        ds.write_stream(fd, len(content), sink, zstd_level=zstd_level)
    finally:
        os.close(fd)
    return content, sink.getvalue()


def import_bytes(stream: bytes, size: int) -> bytes:
    got = bytearray(size)

    def on_data(offset: int, data: bytes) -> None:
        got[offset:offset + len(data)] = data

    src = io.BytesIO(stream)
    header = ims.parse_header(src.read(ds.HEADER.size))
    ims.read_records(ims.Reader(src, header.compressed), header, size, on_data)
    return bytes(got)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


SKIPPABLE = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"


@pytest.mark.parametrize(("zstd_level", "trailer", "phrase"), [
    (3, SKIPPABLE, "a skippable zstd frame"),
    (3, b"\x28\xb5\x2f\xfd", "an incomplete zstd frame"),  # a lone magic
    (3, _zstd(b"x" * 1000)[:12], "an incomplete zstd frame"),
    (3, _zstd(b"x"), "data after its end record"),
    (3, b"garbage", "no zstd frame"),
    (None, b"garbage", "data after its end record"),
    (None, _zstd(b""), "data after its end record"),  # an uncompressed stream has no frames at all
], ids=["zstd-skippable-frame", "zstd-lone-magic", "zstd-12-bytes-of-a-frame", "zstd-frame-with-data",
        "zstd-garbage", "plain-garbage", "plain-empty-zstd-frame"])
def test_data_after_the_end_record_is_refused(tmp_path: Path, zstd_level: int | None, trailer: bytes,
                                              phrase: str) -> None:
    content, stream = stream_bytes(tmp_path, zstd_level)
    with pytest.raises(ims.StreamError, match="data after its end record") as e:
        import_bytes(stream + trailer, len(content))
    assert phrase in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("trailer", [b"", _zstd(b""), _zstd(b"") + _zstd(b"")], ids=["none", "one", "two"])
def test_empty_zstd_frames_after_the_end_record_are_accepted(tmp_path: Path, trailer: bytes) -> None:
    content, stream = stream_bytes(tmp_path, 3)
    assert import_bytes(stream + trailer, len(content)) == content


def test_a_stream_cut_inside_its_last_zstd_frame_is_truncated(tmp_path: Path) -> None:
    import zstandard

    content = bytes(4096) + b"\x01" * 4096
    p = tmp_path / "disk"
    p.write_bytes(content)
    sink = io.BytesIO()
    fd = os.open(p, os.O_RDONLY)
    try:
        ds.write_stream(fd, len(content), sink, zstd_level=3)
    finally:
        os.close(fd)
    # Recompress with a checksum, then drop it: every record arrives, the frame does not end.
    raw = sink.getvalue()
    body = zstandard.ZstdDecompressor().decompressobj().decompress(raw[ds.HEADER.size:])
    stream = raw[:ds.HEADER.size] + zstandard.ZstdCompressor(write_checksum=True).compress(body)[:-4]
    with pytest.raises(ims.StreamError, match="truncated"):
        import_bytes(stream, len(content))


def test_a_zstd_bomb_is_read_in_bounded_pieces() -> None:
    z = ims._Zstd(io.BytesIO(_zstd(bytes(256 * MIB))))
    biggest = 0
    while z.step():
        biggest = max(biggest, z.pending())
        z.read(z.pending())
    assert 0 < biggest <= 40 * MIB
