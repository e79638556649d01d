"""Wrapper detection, announced sizes, the decoders, the tar member reader and the disk writer, in
memory (the decoders with the real tools)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import struct
import subprocess
import tarfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.disk.write import CHUNK, DiskTarget, copy_stream, open_disk, scrub
from instance_cloudimage.image import wrappers
from instance_cloudimage.image.formats import Wrapper
from instance_cloudimage.image.tar import TarMember
from instance_cloudimage.image.wrappers import (
    PipeDecoder,
    announced_size,
    drain,
    identify_wrapper,
    open_decoder,
    xz_announced_size,
)
from instance_cloudimage.runtime import process
from instance_cloudimage.runtime.errors import (
    CommandNotFound,
    ConversionError,
    ImageFetchError,
    ImageTooLarge,
    UnsafeImage,
    UnsupportedFormat,
)
from instance_cloudimage.runtime.process import Spawned, spawn
from tests.support.imagetools import Source

MiB = 1024 * 1024


def tar_bytes(members: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("data,wrapper", [
    (gzip.compress(b"x"), Wrapper.GZIP),
    (lzma.compress(b"x"), Wrapper.XZ),
    (b"BZh91AY&SY" + bytes(20), Wrapper.BZIP2),
    (b"\x28\xb5\x2f\xfd" + bytes(20), Wrapper.ZSTD),
    (tar_bytes({"disk.raw": b"x"}), Wrapper.TAR),
    (tar_bytes({"disk.raw": b"x"}, tarfile.PAX_FORMAT), Wrapper.TAR),
    (b"BZh9 not bzip2 at all" + bytes(600), None),
    (bytes(1024), None),
])
def test_identify_wrapper_by_magic(data: bytes, wrapper: Wrapper | None) -> None:
    assert identify_wrapper(data) is wrapper


def test_tar_magic_needs_a_valid_checksum() -> None:
    data = bytearray(tar_bytes({"disk.raw": b"x"}))
    data[0] ^= 1
    assert identify_wrapper(bytes(data)) is None


def test_unsupported_archives_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedFormat, match="zip archives are not supported"):
        identify_wrapper(b"PK\x03\x04" + bytes(100))


def test_announced_sizes(tmp_path: Path) -> None:
    payload = os.urandom(1000) + bytes(3 * MiB)
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(payload))
    assert announced_size(Wrapper.GZIP, gz.read_bytes()[:64], gz) == len(payload)
    xz = tmp_path / "x.xz"
    # two concatenated streams with stream padding: the last stream's index counts
    xz.write_bytes(lzma.compress(b"a" * 10) + bytes(8) + lzma.compress(payload) + bytes(4))
    assert xz_announced_size(xz) == len(payload)
    assert announced_size(Wrapper.XZ, b"", tmp_path / "missing") is None
    assert announced_size(Wrapper.BZIP2, b"BZh9", None) is None


def zstd_frames(*chunks: bytes) -> bytes:
    import zstandard

    return b"".join(zstandard.ZstdCompressor(write_checksum=True).compress(c) for c in chunks)


def decode(wrapper: Wrapper, data: bytes, step: int = 100_000) -> bytes:
    decoder = open_decoder(wrapper, Source(data, step), f"{wrapper.value}-compressed image")
    try:
        out = bytearray()
        buf = bytearray(CHUNK)
        while n := decoder.readinto(buf):
            out += buf[:n]
        decoder.finish()
    finally:
        decoder.close()
    return bytes(out)


def decode_zstd(data: bytes) -> bytes:
    return decode(Wrapper.ZSTD, data, 1000)


def test_zstd_frames_skippable_frames_and_truncation() -> None:
    a, b = os.urandom(300_000), bytes(2 * MiB)
    skippable = struct.pack("<II", 0x184D2A53, 5) + b"hello"
    assert decode_zstd(zstd_frames(a) + skippable + zstd_frames(b)) == a + b
    whole = zstd_frames(a, b)
    for cut in (1, 5, 100, len(whole) // 2):
        with pytest.raises(ConversionError, match="truncated"):
            decode_zstd(whole[:-cut])
    with pytest.raises(ConversionError, match="data that is not zstd after a frame"):
        decode_zstd(whole + b"trailing junk")


def xz(data: bytes, *options: str) -> bytes:
    return subprocess.run(["xz", "-c", *options], input=data, capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def payload() -> bytes:
    """Random, compressible and zero data: blocks of very different compressed sizes."""
    return os.urandom(300_000) + b"compressible line\n" * 50_000 + bytes(MiB)


XZ_SHAPES = {
    "one block (xz -T1)": ("-T1", "-0"),
    "blocks without sizes (xz -T1 --block-size)": ("-T1", "-0", "--block-size=256KiB"),
    "multi-block, crc64": ("-T2", "-0", "--block-size=256KiB"),
    "crc32": ("-T2", "-0", "--block-size=256KiB", "--check=crc32"),
    "sha256": ("-T2", "-0", "--block-size=256KiB", "--check=sha256"),
    "no check": ("-T2", "-0", "--block-size=256KiB", "--check=none"),
    "x86 BCJ filter": ("-T2", "--x86", "--lzma2=preset=0", "--block-size=256KiB"),
    "64 KiB blocks": ("-T2", "-0", "--block-size=64KiB"),
    "a 64 MiB dictionary, as xz -9": ("-T2", "--lzma2=preset=0,dict=64MiB", "--block-size=256KiB"),
}


@pytest.mark.parametrize("name", XZ_SHAPES)
def test_xz_shapes(name: str, payload: bytes) -> None:
    assert decode(Wrapper.XZ, xz(payload, *XZ_SHAPES[name])) == payload


def test_xz_concatenated_streams_with_padding_and_an_empty_stream(payload: bytes) -> None:
    half = len(payload) // 2
    one, two = xz(payload[:half], "-T2", "-0", "--block-size=256KiB"), xz(payload[half:], "-T1", "-0")
    assert decode(Wrapper.XZ, one + bytes(8) + two + bytes(12) + xz(b"")) == payload
    assert decode(Wrapper.XZ, xz(b"")) == b""


def test_xz_runs_threaded_within_a_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[tuple[tuple[str, ...], dict[str, str]]] = []

    def spy(argv: tuple[str, ...], **kwargs: Any) -> Spawned:
        spawned.append((argv, kwargs["env"]))
        return spawn(argv, **kwargs)

    monkeypatch.setattr(wrappers, "spawn", spy)
    decoder = open_decoder(Wrapper.XZ, Source(xz(b"x")), "xz-compressed image")
    try:
        assert isinstance(decoder, PipeDecoder) and decoder.read() == b"x"
    finally:
        decoder.close()
    assert spawned == [(("xz", "--format=xz", "-T0", "--memlimit-mt-decompress=80MiB", "-dc"),
                        {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"})]


def test_xz_source_errors_pass_through_and_close_stops_the_decoder(payload: bytes) -> None:
    data = xz(payload, "-T2", "-0", "--block-size=256KiB")
    failing = open_decoder(Wrapper.XZ, Source(data, fail_at=len(data) // 2), "xz-compressed image")
    try:
        with pytest.raises(ImageFetchError, match="connection reset"):
            while failing.read(MiB):
                pass
    finally:
        failing.close()
    decoder = open_decoder(Wrapper.XZ, Source(data), "xz-compressed image")
    assert isinstance(decoder, PipeDecoder)
    decoder.read(MiB)
    decoder.close()
    assert decoder.child.proc.returncode is not None and not decoder.thread.is_alive()


def test_tar_member_selection_and_rest_of_archive() -> None:
    disk = os.urandom(5000)
    data = tar_bytes({"box/metadata.json": b"{}", "box/Vagrantfile": b"x" * 700, "box/box.img": disk,
                      "box/info.txt": b"after"})
    member = TarMember(Source(data))
    assert member.name == "box/box.img" and member.size == len(disk)
    out = bytearray(CHUNK)
    n = member.readinto(out)
    assert bytes(out[:n]) == disk and member.readinto(out) == 0
    member.finish()


def test_tar_with_long_names_and_pax_headers() -> None:
    name = "d" * 150 + "/disk.raw"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        assert TarMember(Source(tar_bytes({name: b"x" * 10}, fmt))).name == name


def test_tar_oversized_pax_header_is_refused() -> None:
    header = tarfile.TarInfo("PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 64 * MiB
    block = header.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(UnsafeImage, match="oversized metadata header"):
        TarMember(Source(block + bytes(MiB)))


def test_truncated_tar_member() -> None:
    data = tar_bytes({"disk.raw": os.urandom(100_000)})[:50_000]
    member = TarMember(Source(data))
    with pytest.raises(UnsafeImage, match="truncated"):
        while member.readinto(bytearray(CHUNK)):
            pass


def test_drain_refuses_a_hidden_payload() -> None:
    drain(Source(bytes(1000)), "x")
    with pytest.raises(ConversionError, match="more data after the disk image"):
        drain(Source(bytes(2 * MiB)), "tar archive")


def file_target(tmp_path: Path, size: int, fill: bytes | None, stack: ExitStack) -> DiskTarget:
    path = tmp_path / "disk"
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * size)
    return open_disk(os.fspath(path), wiped=False, stack=stack)


def test_writer_zeroes_stale_data_and_skips_on_a_fresh_file(tmp_path: Path) -> None:
    image = os.urandom(100) + bytes(2 * CHUNK) + os.urandom(100) + bytes(CHUNK + 7)
    for fill in (None, b"S"):
        with ExitStack() as stack:
            target = file_target(tmp_path, 5 * CHUNK, fill, stack)
            assert target.known_zero is (fill is None)
            result = copy_stream(Source(image, CHUNK), target)
            assert result.size == len(image) and result.written == 2 * CHUNK
        data = (tmp_path / "disk").read_bytes()
        assert data[:len(image)] == image and len(data) == 5 * CHUNK


def test_writer_stops_at_the_first_byte_beyond_the_disk(tmp_path: Path) -> None:
    with ExitStack() as stack:
        target = file_target(tmp_path, MiB, None, stack)
        with pytest.raises(ImageTooLarge, match=r"at least 1049600 bytes, the disk holds 1.0 MiB \(1048576 bytes\)"):
            copy_stream(Source(os.urandom(MiB + 1024)), target)
        assert os.fstat(target.fd).st_size == MiB
        result = copy_stream(Source(os.urandom(MiB + 512)), target)  # a trailer may overhang, then end
        assert result.overflow == 512 and result.size == MiB


def test_spool_grows_and_scrub_zeroes_both_ends(tmp_path: Path) -> None:
    with ExitStack() as stack:
        fd = os.open(tmp_path / "spool", os.O_RDWR | os.O_CREAT)
        stack.callback(os.close, fd)
        spool = DiskTarget(os.fspath(tmp_path / "spool"), fd, 10 * MiB, False, True, grows=True)
        copy_stream(Source(os.urandom(100) + bytes(3 * MiB)), spool)
        assert os.fstat(fd).st_size == 3 * MiB + 100
        target = file_target(tmp_path, 8 * MiB, None, stack)
        copy_stream(Source(os.urandom(6 * MiB)), target)
        scrub(target)
    data = (tmp_path / "disk").read_bytes()
    assert data[:MiB] == bytes(MiB) and data[5 * MiB:6 * MiB] == bytes(MiB) and data[MiB:2 * MiB] != bytes(MiB)


@pytest.mark.parametrize(("wrapper", "tool"), [(Wrapper.XZ, "xz"), (Wrapper.GZIP, "pigz"), (Wrapper.BZIP2, "lbzip2")])
def test_a_missing_decoder_tool(wrapper: Wrapper, tool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """xz is required (Python's lzma accepts garbage after the last stream); pigz and lbzip2
    fall back to the stdlib decoder."""
    payload = b"cloud image " * 1000
    data = {Wrapper.XZ: lzma.compress, Wrapper.GZIP: gzip.compress, Wrapper.BZIP2: bz2.compress}[wrapper](payload)
    real = process.find_tool

    def find_tool(name: str) -> str:
        if name == tool:
            raise CommandNotFound(name, process.PACKAGES.get(name))
        return real(name)

    monkeypatch.setattr(process, "find_tool", find_tool)
    if wrapper is Wrapper.XZ:
        with pytest.raises(CommandNotFound, match="required tool 'xz' was not found") as e:
            decode(wrapper, data)
        assert e.value.hint == "install the Debian package xz-utils"
    else:
        assert decode(wrapper, data) == payload
