"""Wrapper detection, announced sizes, the tar member reader and the disk writer, in memory."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import struct
import tarfile
from contextlib import ExitStack
from pathlib import Path

import pytest

from instance_cloudimage.disk.write import CHUNK, DiskTarget, copy_stream, open_disk, scrub
from instance_cloudimage.image.formats import Wrapper
from instance_cloudimage.image.tar import TarMember
from instance_cloudimage.image.wrappers import announced_size, drain, identify_wrapper, xz_announced_size
from instance_cloudimage.runtime.errors import ConversionError, ImageTooLarge, UnsafeImage, UnsupportedFormat

MiB = 1024 * 1024


class Source:
    """A Readable over bytes that hands out at most ``step`` bytes per call, like a pipe."""

    def __init__(self, data: bytes, step: int = 100_000) -> None:
        self.data = io.BytesIO(data)
        self.step = step

    def readinto(self, buf: bytearray | memoryview) -> int:
        view = memoryview(buf)[:self.step]
        return self.data.readinto(view)

    def read(self, n: int = -1) -> bytes:
        return self.data.read(min(n, self.step) if n >= 0 else self.step)


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


def decode_zstd(data: bytes) -> bytes:
    from instance_cloudimage.image.wrappers import open_decoder

    decoder = open_decoder(Wrapper.ZSTD, Source(data, 1000), "zstd-compressed image", Path("/nonexistent"))
    out = bytearray()
    buf = bytearray(CHUNK)
    while n := decoder.readinto(buf):
        out += buf[:n]
    return bytes(out)


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
