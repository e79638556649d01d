"""Parallel in-process xz decoding: images made by the real xz, written through the create
pipeline and compared with qemu-img compare; the shapes that go to the external decoder; and
corrupt, truncated or padded files, each refused with one line (and refused by ``xz -t`` too)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from instance_cloudimage import xzbuffers, xzparallel
from instance_cloudimage.image.formats import Wrapper
from instance_cloudimage.image.wrappers import Layer, PipeDecoder, open_decoder
from instance_cloudimage.runtime.errors import ConversionError, ImageFetchError
from instance_cloudimage.xzformat import (
    HEADER_SIZE,
    BlockHeader,
    build_footer,
    build_index,
    parse_block_header,
    parse_stream_header,
    read_vli,
)
from instance_cloudimage.xzparallel import ParallelXz, external_reason
from tests.support.imagetools import FileStream, MiB, compare, deploy, make_raw_disk, new_disk, run, sh

pytestmark = pytest.mark.integration
SIZE = 32 * MiB


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xz")


@pytest.fixture(scope="module")
def src(work: Path) -> Path:
    return make_raw_disk(work / "src.raw", SIZE)


@pytest.fixture(autouse=True)
def two_cpus_at_least(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a one-CPU runner everything would go to the external decoder."""
    if xzparallel.count_workers() < 2:
        monkeypatch.setattr(xzparallel, "count_workers", lambda: 2)


def xz(src: Path, out: Path, *options: str) -> Path:
    if not out.exists():
        out.write_bytes(sh("xz", "-c", *options, src))
    return out


def decode(image: Path | bytes, work: Path) -> tuple[Layer, bytes]:
    """What open_decoder picks for this .xz, and everything it decodes."""
    source = FileStream(image) if isinstance(image, Path) else Source(image)
    layer = open_decoder(Wrapper.XZ, source, "xz-compressed image", work / "spool")
    try:
        out = b"".join(iter(lambda: layer.read(3 * MiB), b""))
        layer.finish()
    finally:
        layer.close()
    return layer, out


class Source:
    """A Readable over bytes; raises ``error`` once ``fail_at`` bytes were read."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data = io.BytesIO(data)
        self.fail_at = fail_at

    def readinto(self, buf: bytearray | memoryview) -> int:
        if self.fail_at is not None and self.data.tell() >= self.fail_at:
            raise ImageFetchError("the download of the image failed: connection reset")
        return self.data.readinto(buf)

    def read(self, n: int = -1) -> bytes:
        return self.data.read(n)


def decode_and_deploy(image: Path, src: Path, work: Path, tmp_path: Path) -> object:
    """Decode ``image`` alone, then write it through deploy; both must give ``src``'s bytes.
    Returns the decoding layer, for the caller to check which decoder it was."""
    layer, out = decode(image, work)
    assert out == src.read_bytes()
    disk = new_disk(tmp_path / "disk", SIZE)
    assert deploy(image, disk).wrappers == (Wrapper.XZ,)
    compare(disk, src)
    return layer


PARALLEL = {
    "crc64, 2 MiB blocks": ("-T2", "-0", "--block-size=2MiB"),
    "crc32": ("-T2", "-0", "--block-size=1MiB", "--check=crc32"),
    "sha256": ("-T2", "-0", "--block-size=1MiB", "--check=sha256"),
    "no check": ("-T2", "-0", "--block-size=1MiB", "--check=none"),
    "x86 BCJ filter": ("-T2", "--x86", "--lzma2=preset=0", "--block-size=2MiB"),
    "-6, 24 MiB blocks": ("-T2", "-6"),
    "64 KiB blocks, 16 to a job": ("-T2", "-0", "--block-size=64KiB"),
}


@pytest.mark.parametrize("name", PARALLEL)
def test_multi_block_xz_is_decoded_in_parallel(name: str, src: Path, work: Path, tmp_path: Path) -> None:
    image = xz(src, work / f"{name.replace(' ', '_')}.xz", *PARALLEL[name])
    layer = decode_and_deploy(image, src, work, tmp_path)
    assert isinstance(layer, ParallelXz) and layer.unsplit == 0


def test_a_sparse_tar_inside_a_multi_block_xz(src: Path, work: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    sh("cp", "--sparse=always", src, tree / "disk.raw")
    tarball = tmp_path / "disk.tar"
    sh("tar", "-C", tree, "--format=oldgnu", "-S", "-cf", tarball, "disk.raw")
    image = xz(tarball, tmp_path / "disk.tar.xz", "-T2", "-0", "--block-size=256KiB")
    assert isinstance(decode(image, work)[0], ParallelXz)
    disk = new_disk(tmp_path / "disk", SIZE)
    assert deploy(image, disk).wrappers == (Wrapper.XZ, Wrapper.TAR)
    compare(disk, src)


EXTERNAL = {
    "one block (xz -T1)": ("-T1", "-0"),
    "blocks without sizes (xz -T1 --block-size)": ("-T1", "-0", "--block-size=1MiB"),
}


@pytest.mark.parametrize("name", EXTERNAL)
def test_shapes_it_cannot_split_go_to_the_external_decoder(name: str, src: Path, work: Path, tmp_path: Path) -> None:
    image = xz(src, work / f"{name[:9].replace(' ', '_')}.xz", *EXTERNAL[name])
    assert isinstance(decode_and_deploy(image, src, work, tmp_path), PipeDecoder)


def test_an_empty_stream_goes_to_the_external_decoder(work: Path) -> None:
    layer, out = decode(sh("xz", "-c", "/dev/null"), work)
    assert isinstance(layer, PipeDecoder) and out == b""


def halves(src: Path, work: Path, second: tuple[str, ...]) -> tuple[bytes, bytes]:
    data = src.read_bytes()
    (work / "h1").write_bytes(data[:SIZE // 2])
    (work / "h2").write_bytes(data[SIZE // 2:])
    return (sh("xz", "-c", "-T2", "-0", "--block-size=1MiB", work / "h1"), sh("xz", "-c", *second, work / "h2"))


@pytest.mark.parametrize("second", ["parallel", "unsplit"])
def test_concatenated_streams_with_padding(second: str, src: Path, work: Path, tmp_path: Path) -> None:
    """A later stream that cannot be split is decoded in order by the splitter, an empty stream
    too; padding between and after streams is skipped."""
    options = ("-T2", "-0", "--block-size=3MiB", "--check=crc32") if second == "parallel" else ("-T1", "-0")
    one, two = halves(src, work, options)
    empty = sh("xz", "-c", "/dev/null")
    image = tmp_path / "two.xz"
    image.write_bytes(one + bytes(8) + two + bytes(12) + empty)
    assert run(["xz", "-t", str(image)]).returncode == 0
    layer, out = decode(image, work)
    assert isinstance(layer, ParallelXz) and layer.unsplit == (2 if second == "unsplit" else 1)
    assert out == src.read_bytes()
    disk = new_disk(tmp_path / "disk", SIZE)
    deploy(image, disk)
    compare(disk, src)


@pytest.mark.parametrize("spoil,match", [(lambda d: d + b"\0\0\0\0garbage!", "data that is not xz after"),
                                         (lambda d: d[:-20], "truncated"),
                                         (lambda d: d[:-30] + bytes([d[-30] ^ 1]) + d[-29:], "is corrupt: stream 2")],
                         ids=["garbage after", "truncated", "corrupt"])
def test_a_broken_later_stream_that_cannot_be_split_is_refused(spoil: Callable[[bytes], bytes], match: str,
                                                               src: Path, work: Path, tmp_path: Path) -> None:
    one, two = halves(src, work, ("-T1", "-0"))
    image = tmp_path / "bad.xz"
    image.write_bytes(spoil(one + two))
    assert run(["xz", "-t", str(image)], capture_output=True).returncode != 0
    with pytest.raises(ConversionError, match=match):
        deploy(image, new_disk(tmp_path / "disk", SIZE))


def block_offsets(data: bytes) -> list[tuple[int, BlockHeader]]:
    check = parse_stream_header(data[:HEADER_SIZE])
    pos, found = HEADER_SIZE, []
    while data[pos]:
        block = parse_block_header(data[pos:pos + (data[pos] + 1) * 4])
        found.append((pos, block))
        pos += len(block.raw) + block.span(check)
    return found


def with_index(data: bytes, records: list[tuple[int, int]]) -> bytes:
    """``data`` (one stream) with its index and footer replaced by ones listing ``records``."""
    index_start = len(data) - HEADER_SIZE - (int.from_bytes(data[-8:-4], "little") + 1) * 4
    index = build_index(records)
    return data[:index_start] + index + build_footer(data[6:8], len(index))


def records(data: bytes) -> list[tuple[int, int]]:
    check = parse_stream_header(data[:HEADER_SIZE])
    return [(b.unpadded(check), b.uncompressed or 0) for _, b in block_offsets(data)]


def corrupt_block(data: bytes) -> bytes:
    pos, block = block_offsets(data)[2]
    middle = pos + len(block.raw) + (block.compressed or 0) // 2
    return data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:]


def wrong_index(data: bytes) -> bytes:
    wrong = records(data)
    wrong[1] = (wrong[1][0], wrong[1][1] + 1)
    return with_index(data, wrong)


CORRUPT = {
    "corrupt byte in block 3": (corrupt_block, "is corrupt: block 3"),
    "cut inside a block": (lambda d: d[:len(d) // 2], "is truncated"),
    "cut inside the footer": (lambda d: d[:-5], "is truncated"),
    "index disagrees with block 2": (wrong_index, "index is corrupt: its index does not match block 2"),
    "index lists a block too many": (lambda d: with_index(d, records(d) + [(100, 100)]), "lists 17 blocks"),
    "corrupt footer": (lambda d: d[:-8] + bytes([d[-8] ^ 1]) + d[-7:], "footer is corrupt"),
    "garbage after the footer": (lambda d: d + b"garbage! garbage!", "data that is not xz after"),
    "padding not a multiple of four": (lambda d: d + bytes(3), "padding is not a multiple of four"),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_files_are_refused_with_one_line(name: str, src: Path, work: Path, tmp_path: Path) -> None:
    good = xz(src, work / "crc64,_2_MiB_blocks.xz", *PARALLEL["crc64, 2 MiB blocks"]).read_bytes()
    assert len(block_offsets(good)) == 16
    spoil, match = CORRUPT[name]
    image = tmp_path / "bad.xz"
    image.write_bytes(spoil(good))
    assert run(["xz", "-t", str(image)], capture_output=True).returncode != 0, "xz itself refuses it too"
    disk = new_disk(tmp_path / "disk", SIZE)
    with pytest.raises(ConversionError, match=match) as info:
        deploy(image, disk)
    assert "\n" not in str(info.value)
    with open(disk, "rb") as f:
        assert f.read(MiB) == bytes(MiB), "no partial image is left to boot"


def test_a_corrupt_block_among_small_ones_is_refused(src: Path, work: Path, tmp_path: Path) -> None:
    data = xz(src, work / "64_KiB_blocks,_16_to_a_job.xz", *PARALLEL["64 KiB blocks, 16 to a job"]).read_bytes()
    pos, block = block_offsets(data)[39]
    middle = pos + len(block.raw) + (block.compressed or 0) // 2
    image = tmp_path / "bad.xz"
    image.write_bytes(data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:])
    assert run(["xz", "-t", str(image)], capture_output=True).returncode != 0
    with pytest.raises(ConversionError, match="is corrupt: blocks? 33"):  # blocks 33-48 go together
        deploy(image, new_disk(tmp_path / "disk", SIZE))


def test_a_stream_mixing_blocks_with_and_without_sizes_is_refused(src: Path, work: Path, tmp_path: Path) -> None:
    """Valid per the format, made by no xz: it cannot be split, and it is past the point where
    the external decoder could take over."""
    one, two = halves(src, work, ("-T1", "-0"))
    unsized_at = HEADER_SIZE
    index_at = len(two) - HEADER_SIZE - (int.from_bytes(two[-8:-4], "little") + 1) * 4
    unpadded, pos = read_vli(two, index_at + 2)
    uncompressed, _ = read_vli(two, pos)
    mixed = with_index(one, records(one))  # the same bytes, as a base to splice into
    body_end = len(mixed) - HEADER_SIZE - (int.from_bytes(mixed[-8:-4], "little") + 1) * 4
    image = tmp_path / "mixed.xz"
    image.write_bytes(with_index(mixed[:body_end] + two[unsized_at:index_at] + mixed[body_end:],
                                 records(one) + [(unpadded, uncompressed)]))
    assert run(["xz", "-t", str(image)]).returncode == 0
    with pytest.raises(ConversionError, match="mixes blocks with and without recorded sizes"):
        deploy(image, new_disk(tmp_path / "disk", SIZE))


def test_buffers_stay_within_their_budgets(src: Path, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While nothing is read, the block being read keeps its bytes in memory and the blocks ahead
    spill; read slowly, memory and spill stay within their budgets, the splitter reads at most
    one block beyond the decoders, and the decoders stay within their window."""
    monkeypatch.setattr(xzbuffers, "MEMORY_BUDGET", 256 * 1024)
    monkeypatch.setattr(xzbuffers, "CURRENT_CAP", 64 * 1024)
    monkeypatch.setattr(xzbuffers, "SPILL_BUDGET", 3 * MiB)
    monkeypatch.setattr(xzparallel, "count_workers", lambda: 2)
    image = xz(src, work / "crc64,_2_MiB_blocks.xz", *PARALLEL["crc64, 2 MiB blocks"])
    layer = open_decoder(Wrapper.XZ, FileStream(image), "xz-compressed image", work / "spool")
    assert isinstance(layer, ParallelXz) and layer.workers == 2
    window = 2 * xzparallel.WINDOW_PER_WORKER

    def check_bounds() -> None:
        assert layer.spilled <= 3 * MiB
        assert layer.memory <= 256 * 1024 + 64 * 1024 + 4 * MiB  # + a chunk per active buffer
        assert layer.current <= layer.claimed <= layer.current + window
        assert layer.created <= layer.claimed + 1

    try:
        with layer.cv:  # block 1 (2-4 MiB of src) is random data: it must spill
            assert layer.cv.wait_for(lambda: layer.spilled > 0, timeout=60)
            assert layer.jobs[0].output.spilled == 0, "the block being read never spills"
            check_bounds()
        out = bytearray()
        while piece := layer.read(64 * 1024):
            out += piece
            with layer.cv:
                check_bounds()
        assert out == src.read_bytes()
        assert layer.memory == layer.spilled == 0
    finally:
        layer.close()


def test_source_errors_pass_through_and_close_stops_every_thread(src: Path, work: Path) -> None:
    data = xz(src, work / "crc64,_2_MiB_blocks.xz", *PARALLEL["crc64, 2 MiB blocks"]).read_bytes()
    failing = open_decoder(Wrapper.XZ, Source(data, fail_at=len(data) // 2), "xz-compressed image", work)
    try:
        with pytest.raises(ImageFetchError, match="connection reset"):
            while failing.read(MiB):
                pass
    finally:
        failing.close()
    layer = open_decoder(Wrapper.XZ, Source(data), "xz-compressed image", work / "spool")
    assert isinstance(layer, ParallelXz)
    layer.read(MiB)
    layer.close()
    assert not any(thread.is_alive() for thread in layer.threads)
    assert threading.active_count() < 10


def test_external_reasons() -> None:
    lzma2 = ((0x21, bytes([16])),)  # 1 MiB dictionary
    sized = BlockHeader(b"", 100, 200, lzma2)
    assert external_reason(4, sized, 2) is None
    assert external_reason(4, sized, 1) == "one CPU"
    assert external_reason(4, None, 2) == "the stream has no blocks"
    assert "check type 2" in (external_reason(2, sized, 2) or "")
    assert "sizes" in (external_reason(4, BlockHeader(b"", None, None, lzma2), 2) or "")
    huge = BlockHeader(b"", 100, 200, ((0x21, bytes([30])),))  # 64 MiB, as xz -9
    assert "memory" in (external_reason(4, huge, 2) or "")
