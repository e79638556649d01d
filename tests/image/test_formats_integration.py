"""Every disk format and wrapper, built with qemu-img and standard tools, written through the
create pipeline and compared with ``qemu-img compare`` against the source's raw view."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from instance_cloudimage.image import wrappers
from instance_cloudimage.image.formats import DiskFormat, Wrapper
from instance_cloudimage.runtime.errors import UnsafeImage
from tests.support.imagetools import (
    MiB,
    compare,
    deploy,
    loop_device,
    make_raw_disk,
    new_disk,
    nonzero_chunk_bytes,
    qemu_convert,
    root,
    run,
    sh,
)

pytestmark = pytest.mark.integration
SIZE = 32 * MiB


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("formats")


@pytest.fixture(scope="module")
def src(work: Path) -> Path:
    return make_raw_disk(work / "src.raw", SIZE)


def build_iso(work: Path) -> Path:
    tree = work / "isotree"
    (tree / "dir").mkdir(parents=True, exist_ok=True)
    (tree / "dir" / "file.txt").write_bytes(b"iso content\n" * 5000)
    iso = work / "image.iso"
    sh("xorriso", "-as", "mkisofs", "-quiet", "-V", "CIDATA", "-o", iso, tree)
    return iso


def build_mbr(work: Path) -> Path:
    path = make_raw_disk(work / "mbr.raw", SIZE, seed=2)
    sh("sfdisk", "-q", "--no-reread", "--no-tell-kernel", "--wipe", "never", "--label", "dos", path,
       input=b"start=2048, size=20480, type=83\n")
    return path


# name → (builder(src, work) -> image, raw view to compare with or None for src, expected format)
FORMATS: dict[str, tuple[Callable[[Path, Path], Path], DiskFormat, str]] = {
    "qcow2 v3": (lambda s, w: qemu_convert(s, w / "v3.qcow2", "qcow2"), DiskFormat.QCOW2, "qcow2 v3"),
    "qcow2 v2": (lambda s, w: qemu_convert(s, w / "v2.qcow2", "qcow2", "-o", "compat=0.10"),
                 DiskFormat.QCOW2, "qcow2 v2"),
    "qcow2 zlib": (lambda s, w: qemu_convert(s, w / "c.qcow2", "qcow2", "-c"), DiskFormat.QCOW2, "qcow2 v3"),
    "qcow2 zstd": (lambda s, w: qemu_convert(s, w / "z.qcow2", "qcow2", "-c", "-o", "compression_type=zstd"),
                   DiskFormat.QCOW2, "qcow2 v3"),
    "qcow2 extended l2": (lambda s, w: qemu_convert(s, w / "e.qcow2", "qcow2", "-o",
                                                    "extended_l2=on,cluster_size=128k"), DiskFormat.QCOW2, "qcow2 v3"),
    "vmdk sparse": (lambda s, w: qemu_convert(s, w / "s.vmdk", "vmdk"), DiskFormat.VMDK, "vmdk monolithicSparse"),
    "vmdk stream": (lambda s, w: qemu_convert(s, w / "so.vmdk", "vmdk", "-o", "subformat=streamOptimized"),
                    DiskFormat.VMDK, "vmdk streamOptimized"),
    "vdi": (lambda s, w: qemu_convert(s, w / "d.vdi", "vdi"), DiskFormat.VDI, "vdi"),
    "vdi static": (lambda s, w: qemu_convert(s, w / "st.vdi", "vdi", "-o", "static=on"), DiskFormat.VDI,
                   "vdi (static)"),
    "vhd dynamic": (lambda s, w: qemu_convert(s, w / "d.vhd", "vpc"), DiskFormat.VPC, "vhd (dynamic)"),
    "vhd fixed": (lambda s, w: qemu_convert(s, w / "f.vhd", "vpc", "-o", "subformat=fixed"), DiskFormat.VPC,
                  "vhd (fixed)"),
    "vhdx": (lambda s, w: qemu_convert(s, w / "x.vhdx", "vhdx"), DiskFormat.VHDX, "vhdx"),
    "vhdx fixed": (lambda s, w: qemu_convert(s, w / "xf.vhdx", "vhdx", "-o", "subformat=fixed"), DiskFormat.VHDX,
                   "vhdx"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_is_written_exactly(name: str, src: Path, work: Path, tmp_path: Path) -> None:
    build, fmt, details = FORMATS[name]
    image = build(src, work)
    disk = new_disk(tmp_path / "disk", 40 * MiB)  # a VHD's CHS geometry rounds its size up
    done = deploy(image, disk)
    assert done.detected.format is fmt
    assert done.detected.details == details
    compare(disk, src)


@pytest.mark.parametrize("local", [False, True], ids=["streamed", "local-file"])
@pytest.mark.parametrize("kind", ["gpt", "mbr", "iso"])
def test_raw_images(kind: str, local: bool, src: Path, work: Path, tmp_path: Path) -> None:
    image = {"gpt": lambda: src, "mbr": lambda: build_mbr(work), "iso": lambda: build_iso(work)}[kind]()
    disk = new_disk(tmp_path / "disk", SIZE)
    done = deploy(image, disk, local=local, declared="raw")
    assert done.detected.format is DiskFormat.RAW
    assert {"gpt": "GPT", "mbr": "MBR", "iso": "ISO 9660"}[kind] in done.detected.details
    compare(disk, image)


def compress(tool: list[str], src: Path, out: Path) -> Path:
    if out.exists():  # built once per module
        return out
    with open(src, "rb") as i, open(out, "wb") as o:
        run(tool, stdin=i, stdout=o, check=True)
    return out


WRAPPED: dict[str, tuple[Callable[[Path, Path], Path], tuple[Wrapper, ...]]] = {
    "gzip": (lambda s, w: compress(["pigz", "-c"], s, w / "i.raw.gz"), (Wrapper.GZIP,)),
    "xz multi-block": (lambda s, w: compress(["xz", "-T2", "-0", "--block-size=4MiB", "-c"], s, w / "i.raw.xz"),
                       (Wrapper.XZ,)),
    "bzip2": (lambda s, w: compress(["bzip2", "-1", "-c"], s, w / "i.raw.bz2"), (Wrapper.BZIP2,)),
    "zstd": (lambda s, w: compress(["zstd", "-q", "-c"], s, w / "i.raw.zst"), (Wrapper.ZSTD,)),
}


@pytest.mark.parametrize("name", WRAPPED)
def test_compressed_raw_streams(name: str, src: Path, work: Path, tmp_path: Path) -> None:
    build, chain = WRAPPED[name]
    image = build(src, work)
    disk = new_disk(tmp_path / "disk", SIZE)
    done = deploy(image, disk, local=True)
    assert done.wrappers == chain
    assert done.detected.format is DiskFormat.RAW
    assert done.written == nonzero_chunk_bytes(src) < SIZE  # zero chunks were skipped
    compare(disk, src)


@pytest.mark.parametrize("wrapper", [Wrapper.GZIP, Wrapper.XZ, Wrapper.BZIP2])
def test_in_process_decoders_when_tools_are_missing(wrapper: Wrapper, src: Path, work: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    build = {Wrapper.GZIP: WRAPPED["gzip"][0], Wrapper.XZ: WRAPPED["xz multi-block"][0],
             Wrapper.BZIP2: WRAPPED["bzip2"][0]}[wrapper]
    monkeypatch.setitem(wrappers.DECODERS, wrapper, (("no-such-decoder-tool",), None))
    disk = new_disk(tmp_path / "disk", SIZE)
    done = deploy(build(src, work), disk)
    assert done.wrappers == (wrapper,)
    compare(disk, src)


def tar(work: Path, out: str, members: dict[str, Path | bytes], *options: str) -> Path:
    """A tar made by GNU tar from files named as the members, in that order."""
    tree = work / (out + ".d")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    for name, content in members.items():
        if isinstance(content, Path):
            sh("cp", "--sparse=always", content, tree / name)
        else:
            (tree / name).write_bytes(content)
    sh("tar", "-C", tree, *options, "-cf", work / out, *members)
    return work / out


def test_gce_style_sparse_tar_gz(src: Path, work: Path, tmp_path: Path) -> None:
    image = tar(work, "gce.tar.gz", {"disk.raw": src}, "--format=oldgnu", "-S", "-z")
    disk = new_disk(tmp_path / "disk", SIZE)
    done = deploy(image, disk)
    assert done.wrappers == (Wrapper.GZIP, Wrapper.TAR)
    compare(disk, src)


def test_pax_sparse_tar_xz(src: Path, work: Path, tmp_path: Path) -> None:
    image = tar(work, "pax.tar.xz", {"disk.raw": src}, "--format=posix", "-S", "-J")
    disk = new_disk(tmp_path / "disk", SIZE)
    assert deploy(image, disk).wrappers == (Wrapper.XZ, Wrapper.TAR)
    compare(disk, src)


def test_plain_tar(src: Path, work: Path, tmp_path: Path) -> None:
    image = tar(work, "plain.tar", {"README": b"not the disk\n", "disk.raw": src})
    disk = new_disk(tmp_path / "disk", SIZE)
    assert deploy(image, disk).wrappers == (Wrapper.TAR,)
    compare(disk, src)


def test_ova_streams_its_vmdk(src: Path, work: Path, tmp_path: Path) -> None:
    vmdk = qemu_convert(src, work / "ova-disk1.vmdk", "vmdk", "-o", "subformat=streamOptimized")
    ovf = b'<?xml version="1.0"?><Envelope><References><File ovf:href="vm-disk1.vmdk"/></References></Envelope>'
    image = tar(work, "vm.ova", {"vm.ovf": ovf, "vm-disk1.vmdk": vmdk, "vm.mf": b"SHA256(vm.ovf)= 00\n"},
                "--format=ustar")
    disk = new_disk(tmp_path / "disk", SIZE)
    done = deploy(image, disk, declared="vmdk")
    assert done.wrappers == (Wrapper.TAR,)
    assert done.detected.details == "vmdk streamOptimized"
    compare(disk, src)
    assert not list((work / "spool").glob("*")), "the spool file is removed"


def test_vagrant_box_with_qcow2(src: Path, work: Path, tmp_path: Path) -> None:
    box_img = qemu_convert(src, work / "box.qcow2", "qcow2")
    metadata = json.dumps({"provider": "libvirt", "format": "qcow2", "virtual_size": 1}).encode()
    image = tar(work, "package.box", {"metadata.json": metadata, "Vagrantfile": b"Vagrant.configure('2')\n",
                                      "box.img": box_img}, "-z")
    disk = new_disk(tmp_path / "disk", SIZE)
    done = deploy(image, disk, declared="qcow2")
    assert done.wrappers == (Wrapper.GZIP, Wrapper.TAR)
    assert done.detected.format is DiskFormat.QCOW2
    compare(disk, src)


def test_nested_qcow2_xz(src: Path, work: Path, tmp_path: Path) -> None:
    image = compress(["xz", "-T2", "-0", "-c"], qemu_convert(src, work / "n.qcow2", "qcow2"), work / "n.qcow2.xz")
    disk = new_disk(tmp_path / "disk", SIZE)
    assert deploy(image, disk).wrappers == (Wrapper.XZ,)
    compare(disk, src)


def test_azure_style_fixed_vhd_in_tar_gz_exactly_filling_the_disk(src: Path, work: Path, tmp_path: Path) -> None:
    vhd = qemu_convert(src, work / "azure.vhd", "vpc", "-o", "subformat=fixed,force_size=on")
    image = tar(work, "azure.vhd.tar.gz", {"livecd.azure.vhd": vhd}, "--format=oldgnu", "-S", "-z")
    disk = new_disk(tmp_path / "disk", SIZE)  # the footer lies past the disk's end
    done = deploy(image, disk, declared="vhd")
    assert done.detected.details == "vhd (fixed)" and done.detected.virtual_size == SIZE
    compare(disk, src)


def test_checksum_is_verified_after_streaming_and_a_mismatch_scrubs_the_disk(src: Path, work: Path,
                                                                          tmp_path: Path) -> None:
    from instance_cloudimage.runtime.errors import ChecksumMismatch

    image = WRAPPED["zstd"][0](src, work)
    disk = new_disk(tmp_path / "disk", SIZE)
    with pytest.raises(ChecksumMismatch):
        deploy(image, disk, sha256="0" * 64)
    with open(disk, "rb") as f:
        assert f.read(MiB) == bytes(MiB), "the partition table is gone: the image can never boot"
        f.seek(SIZE - MiB)
        assert f.read(MiB) == bytes(MiB), "the backup GPT is gone too"


@pytest.mark.skipif(not root(), reason="needs root for loop devices")
@pytest.mark.parametrize("name", ["raw.gz", "raw local", "qcow2", "gce tar.gz"])
def test_stale_data_on_a_block_device_does_not_survive(name: str, src: Path, work: Path, tmp_path: Path) -> None:
    image, local = {
        "raw.gz": lambda: (WRAPPED["gzip"][0](src, work), False),
        "raw local": lambda: (src, True),
        "qcow2": lambda: (qemu_convert(src, work / "b.qcow2", "qcow2"), False),
        "gce tar.gz": lambda: (tar(work, "g2.tar.gz", {"disk.raw": src}, "--format=oldgnu", "-S", "-z"), False),
    }[name]()
    backing = new_disk(tmp_path / "backing", SIZE, fill=b"\x53")
    with loop_device(backing) as dev:
        deploy(image, dev, local=local)
        compare(dev, src)


@pytest.mark.skipif(not root(), reason="needs root for loop devices")
def test_wiped_block_device_skips_zero_chunks(src: Path, work: Path, tmp_path: Path) -> None:
    backing = new_disk(tmp_path / "backing", SIZE)
    with loop_device(backing) as dev:
        done = deploy(WRAPPED["zstd"][0](src, work), dev, wiped=True)
        assert done.written == nonzero_chunk_bytes(src) < SIZE
        compare(dev, src)


def test_existing_file_disk_with_data_gets_zeros_in_holes(src: Path, work: Path, tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "disk", SIZE, fill=b"\x53")
    deploy(WRAPPED["xz multi-block"][0](src, work), disk)
    compare(disk, src)
    assert os.path.getsize(disk) == SIZE, "a file disk never grows"


def write_site(tmp_path: Path, allowed: Path) -> tuple[Path, Path]:
    etc, cache = tmp_path / "etc", tmp_path / "cache"
    (etc / "variants").mkdir(parents=True)
    (etc / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {allowed}\n")
    (etc / "variants" / "plain.conf").write_text(
        "[Variant]\nDescription = plain disk\nAgent = none\nSeed = none\nArchitectures = x86_64 aarch64\n"
        "[Image]\nURL = builtin:demo\n")
    return etc, cache


def cli_create(tmp_path: Path, image: Path, disk: Path, allowed: Path) -> subprocess.CompletedProcess[str]:
    etc, cache = write_site(tmp_path, allowed)
    main = "import sys; from instance_cloudimage.cli.main import main; sys.exit(main())"
    argv = [sys.executable, "-c", main, "create", "--disk", str(disk), "--disk-size", "40M", "--variant", "plain",
            "--config-dir", str(etc), "--cache-dir", str(cache), "-O", f"image={image}"]
    return run(argv, capture_output=True, text=True)


def test_cli_create_writes_a_compressed_qcow2(src: Path, work: Path, tmp_path: Path) -> None:
    image = compress(["gzip", "-1", "-c"], qemu_convert(src, work / "cli.qcow2", "qcow2"), work / "cli.qcow2.gz")
    disk = tmp_path / "disk.img"
    proc = cli_create(tmp_path, image, disk, work)
    assert proc.returncode == 0, proc.stderr
    assert "qcow2 v3" in proc.stderr
    compare(disk, src)


def test_cli_create_refuses_an_image_larger_than_the_disk(src: Path, work: Path, tmp_path: Path) -> None:
    big = work / "big.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", big, "1G")
    proc = cli_create(tmp_path, big, tmp_path / "disk.img", work)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "1073741824 bytes" in errors[0] and "41943040 bytes" in errors[0]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
def test_disk_on_tmpfs(src: Path, work: Path) -> None:
    disk = Path("/dev/shm") / f"cloudimage-test-{os.getpid()}.img"
    try:
        new_disk(disk, SIZE)
        deploy(qemu_convert(src, work / "shm.qcow2", "qcow2"), disk)
        compare(disk, src)
    finally:
        disk.unlink(missing_ok=True)


def test_stream_optimized_vmdk_with_a_footer(src: Path, work: Path, tmp_path: Path) -> None:
    """VMware's one-pass writers put the grain directory offset in a footer (GD_AT_END)."""
    import struct

    data = bytearray(qemu_convert(src, work / "foot.vmdk", "vmdk", "-o", "subformat=streamOptimized").read_bytes())
    header = bytes(data[:512])
    data[56:64] = struct.pack("<Q", 0xFFFFFFFFFFFFFFFF)  # the header defers to the footer
    footer_marker = struct.pack("<QII", 0, 0, 3).ljust(512, b"\0")
    image = tmp_path / "footer.vmdk"
    image.write_bytes(bytes(data) + footer_marker + header + bytes(512))
    disk = new_disk(tmp_path / "disk", SIZE)
    assert deploy(image, disk).detected.details == "vmdk streamOptimized"
    compare(disk, src)
    image.write_bytes(bytes(data) + footer_marker + header[:200])  # cut inside the footer
    with pytest.raises(UnsafeImage, match="truncated: its footer is missing"):
        deploy(image, new_disk(tmp_path / "disk2", SIZE))


def test_declared_format_narrows_detection(src: Path, work: Path, tmp_path: Path) -> None:
    fixed = qemu_convert(src, work / "f.vhd", "vpc", "-o", "subformat=fixed")
    for declared in ("raw", "vhd", "auto"):
        disk = new_disk(tmp_path / "disk", 40 * MiB)
        assert deploy(fixed, disk, declared=declared).detected.details == "vhd (fixed)"
        compare(disk, src)
    with pytest.raises(UnsafeImage, match="declared as vhd but its content is raw"):
        deploy(src, new_disk(tmp_path / "disk", SIZE), declared="vhd")  # known only at the end: scrubbed
    with open(tmp_path / "disk", "rb") as f:
        assert f.read(MiB) == bytes(MiB)
    with pytest.raises(UnsafeImage, match="declared as qcow2 but its content is raw"):
        deploy(src, new_disk(tmp_path / "disk", SIZE), declared="qcow2")
