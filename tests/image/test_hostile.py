"""The hostile corpus: images built to make a provider copy host files into a guest, exhaust the
host, or be read differently by different tools.  Every one must be refused with one clear line,
and the secret bytes must never reach the target disk.

Secrets are temporary files made here; ``qemu-img create -o data_file=`` truncates its target, so
no real host file is ever named.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from instance_cloudimage.image.detect import describe_content
from instance_cloudimage.runtime.errors import (
    ConversionError,
    ImageTooLarge,
    UnsafeImage,
    UnsupportedFormat,
    UserError,
)
from tests.image.test_formats_integration import cli_create
from tests.support.imagetools import (
    SECRET,
    MiB,
    compare,
    contains,
    deploy,
    make_raw_disk,
    new_disk,
    qemu_convert,
    run,
    sh,
)

pytestmark = pytest.mark.integration
DISK = 32 * MiB


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def secret(work: Path) -> Path:
    path = work / "secret.txt"
    path.write_bytes(SECRET * 64)
    return path


def refused(image: Path, tmp_path: Path, error: type[UserError], match: str, **kwargs: object) -> str:
    """Deploy ``image`` onto a fresh disk; it must fail with one line, leaving no secret behind."""
    disk = new_disk(tmp_path / "disk", DISK)
    with pytest.raises(error, match=match) as info:
        deploy(image, disk, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and len(message) < 300, message
    assert not contains(disk, SECRET)
    assert os.path.getsize(disk) == DISK
    return message


def leaks(argv: list[str], out: Path) -> bool:
    """Does this qemu-img command copy the secret?  Proves the corpus really is hostile."""
    run(argv + [os.fspath(out)], check=True, capture_output=True)
    return contains(out, SECRET)


def backing_qcow2(work: Path, secret: Path) -> Path:
    path = work / "backing.qcow2"
    if not path.exists():
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", path, "1M")
    return path


def test_qcow2_with_a_backing_file(work: Path, secret: Path, tmp_path: Path) -> None:
    image = backing_qcow2(work, secret)
    assert leaks(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", os.fspath(image)], tmp_path / "out")
    refused(image, tmp_path, UnsafeImage, "backing file")


def test_qcow2_with_an_external_data_file(work: Path, secret: Path, tmp_path: Path) -> None:
    data_file = work / "data-file.raw"
    image = work / "datafile.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data_file},data_file_raw=on", image, "1M")
    data_file.write_bytes(secret.read_bytes())  # qemu-img create truncated it; now it "holds host data"
    assert leaks(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", os.fspath(image)], tmp_path / "out")
    refused(image, tmp_path, UnsafeImage, "external data file")


def test_vmdk_descriptor_with_a_flat_extent_naming_a_host_file(work: Path, secret: Path, tmp_path: Path) -> None:
    image = work / "flat.vmdk"
    image.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                     f'createType="monolithicFlat"\n\nRW 2048 FLAT "{secret}" 0\n')
    assert leaks(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", os.fspath(image)], tmp_path / "out")
    refused(image, tmp_path, UnsupportedFormat, "VMDK descriptor")


def patch_vmdk_descriptor(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """Edit the descriptor embedded in a sparse VMDK (at sector 1, NUL-padded to its size)."""
    data = bytearray(src.read_bytes())
    end = data.index(b"\0", 512)
    text = bytes(data[512:end]).replace(old, new)
    assert old in data[512:end] and 512 + len(text) <= 512 * 21
    data[512:512 + len(text)] = text
    dst.write_bytes(bytes(data))
    return dst


def test_sparse_vmdk_whose_embedded_descriptor_names_a_host_file(work: Path, secret: Path, tmp_path: Path) -> None:
    raw = new_disk(work / "small.raw", MiB)
    sparse = qemu_convert(raw, work / "small.vmdk", "vmdk")
    bad = patch_vmdk_descriptor(sparse, work / "extent.vmdk", b'RW 2048 SPARSE "small.vmdk"',
                                f'RW 2048 FLAT "{secret}" 0'.encode())
    refused(bad, tmp_path, UnsafeImage, "one sparse extent")
    parent = patch_vmdk_descriptor(sparse, work / "parent.vmdk", b"parentCID=ffffffff",
                                   f'parentCID=12345678\nparentFileNameHint="{secret}"'.encode())
    refused(parent, tmp_path, UnsafeImage, "parent disk")


def test_raw_image_starting_with_a_qcow2_header(work: Path, secret: Path, tmp_path: Path) -> None:
    image = work / "fake.raw"
    image.write_bytes(backing_qcow2(work, secret).read_bytes() + os.urandom(MiB))
    refused(image, tmp_path, UnsafeImage, "declared as raw but its content is qcow2", declared="raw")
    refused(image, tmp_path, UnsafeImage, "backing file")


def test_polyglot_iso_hiding_a_qcow2_header(work: Path, secret: Path, tmp_path: Path) -> None:
    tree = work / "iso"
    tree.mkdir(exist_ok=True)
    (tree / "meta-data").write_text("instance-id: x\n")
    iso = work / "plain.iso"
    sh("xorriso", "-as", "mkisofs", "-quiet", "-V", "CIDATA", "-o", iso, tree)
    header = backing_qcow2(work, secret).read_bytes()[:32 * 1024]  # fits in the ISO's system area
    data = bytearray(iso.read_bytes())
    data[:len(header)] = header
    polyglot = work / "polyglot.iso"
    polyglot.write_bytes(bytes(data))
    assert "ISO 9660" in describe_content(bytes(data[:1024 * 1024])), "libmagic is fooled, as documented"
    assert leaks(["qemu-img", "convert", "-O", "raw", os.fspath(polyglot)], tmp_path / "out"), "qemu probes qcow2"
    message = refused(polyglot, tmp_path, UnsafeImage, "several formats")
    assert "qcow2" in message and "ISO 9660" in message


def test_qcow2_larger_than_the_disk(work: Path, tmp_path: Path) -> None:
    image = work / "big.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", image, "1G")
    message = refused(image, tmp_path, ImageTooLarge, "larger than the disk")
    assert "1073741824 bytes" in message and f"{DISK} bytes" in message


def zeros_compressed(work: Path, tool: list[str], name: str, size: int = DISK + 4 * MiB) -> Path:
    out = work / name
    if not out.exists():
        with open(out, "wb") as f:
            run(tool, input=bytes(size), stdout=f, check=True)
    return out


BOMBS = {
    "gzip": (["gzip", "-c"], "bomb.gz"),
    "xz": (["xz", "-T2", "-c"], "bomb.xz"),
    "zstd": (["zstd", "-q", "-c", f"--stream-size={DISK + 4 * MiB}"], "bomb.zst"),  # size in the frame header
    "bzip2": (["bzip2", "-c"], "bomb.bz2"),
}


@pytest.mark.parametrize("local", [True, False], ids=["announced-size", "streaming-cap"])
@pytest.mark.parametrize("kind", BOMBS)
def test_decompression_bombs(kind: str, local: bool, work: Path, tmp_path: Path) -> None:
    tool, name = BOMBS[kind]
    image = zeros_compressed(work, tool, name)
    announces = local and kind != "bzip2" or kind == "zstd"  # bzip2 has no size; zstd's is in its header
    message = refused(image, tmp_path, ImageTooLarge, "announces" if announces else "larger than the disk",
                      local=local)
    assert f"{DISK} bytes" in message


def test_bomb_inside_a_tar_is_refused_by_its_member_size(work: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("disk.raw")
        info.size = 2 * DISK
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    image = work / "bomb.tar.gz"
    image.write_bytes(buf.getvalue())
    refused(image, tmp_path, ImageTooLarge, "announces 64.0 MiB")


def test_truncated_qcow2(work: Path, tmp_path: Path) -> None:
    full = qemu_convert(make_raw_disk(work / "t.raw", 16 * MiB), work / "full.qcow2", "qcow2")
    cut = work / "cut.qcow2"
    cut.write_bytes(full.read_bytes()[:full.stat().st_size * 6 // 10])
    refused(cut, tmp_path, UnsafeImage, "truncated")


@pytest.mark.parametrize("kind", BOMBS)
def test_truncated_compressed_images_fail(kind: str, work: Path, tmp_path: Path) -> None:
    tool, name = BOMBS[kind]
    whole = zeros_compressed(work, [t for t in tool if not t.startswith("--stream-size")], "small-" + name, MiB)
    cut = work / ("cut-" + name)
    cut.write_bytes(whole.read_bytes()[:-9])
    refused(cut, tmp_path, ConversionError, "could not be decompressed|is truncated")


def create_luks(fmt: str, options: str, image: Path) -> None:
    """qemu-img create with LUKS; its PBKDF benchmark fails now and then on a loaded machine
    ("Unable to get accurate CPU usage"), so try again."""
    for _attempt in range(5):
        proc = run(["qemu-img", "create", "-q", "-f", fmt, "--object", "secret,id=sec0,data=123456", "-o", options,
                    os.fspath(image), "16M"], capture_output=True, text=True)
        if proc.returncode == 0:
            return
    raise AssertionError(proc.stderr)


def test_encrypted_qcow2(work: Path, tmp_path: Path) -> None:
    image = work / "luks.qcow2"
    create_luks("qcow2", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", image)
    refused(image, tmp_path, UnsafeImage, "encrypted")


@pytest.mark.parametrize("fmt,match", [
    ("luks", "LUKS-encrypted images are not supported"),
    ("qed", "QED images are not supported"),
    ("parallels", "Parallels images are not supported"),
    ("qcow", r"qcow \(version 1\) images are not supported"),
])
def test_refused_formats(fmt: str, match: str, work: Path, tmp_path: Path) -> None:
    image = work / f"x.{fmt}"
    if fmt == "luks":
        create_luks(fmt, "key-secret=sec0,iter-time=100", image)
    else:
        sh("qemu-img", "create", "-q", "-f", fmt, image, "16M")
    refused(image, tmp_path, UnsupportedFormat, match)


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
def test_vmdk_with_extents_in_other_files(subformat: str, work: Path, tmp_path: Path) -> None:
    image = work / f"{subformat}.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", image, "16M")
    refused(image, tmp_path, UnsupportedFormat, "VMDK descriptor")


@pytest.mark.parametrize("name,content,match", [
    ("dmg", b"\0" * 4096 + b"koly" + b"\0" * 508, "DMG images"),
    ("cloop", b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n" + b"\0" * 4096,
     "cloop images"),
    ("bochs", b"Bochs Virtual HD Image\0" + b"\0" * 4096, "Bochs images"),
    ("html", b"<html><body>404 Not Found</body></html>\n", "text, not a disk image"),
    ("lz4", b"\x04\x22\x4d\x18" + b"\0" * 100, "lz4 archives"),
])
def test_crafted_refusals(name: str, content: bytes, match: str, work: Path, tmp_path: Path) -> None:
    image = work / f"crafted.{name}"
    image.write_bytes(content)
    refused(image, tmp_path, UnsupportedFormat if name != "html" else UnsafeImage, match)


def make_tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"\0" * 4096) -> Path:
    with tarfile.open(path, "w") as tf:
        for info in members:
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("members,error,match", [
    ([member("../disk.raw")], UnsafeImage, "points outside the archive"),
    ([member("ok.txt"), member("a/../../evil.img")], UnsafeImage, "points outside the archive"),
    ([member("/etc/disk.raw")], UnsafeImage, "points outside the archive"),
    ([member("disk.raw", tarfile.SYMTYPE, "/etc/shadow")], UnsafeImage, "symbolic link"),
    ([member("disk.raw", tarfile.LNKTYPE, "other")], UnsafeImage, "hard link"),
    ([member("disk.raw", tarfile.CHRTYPE)], UnsafeImage, "device"),
    ([member("readme.txt")], UnsupportedFormat, "no disk image member"),
    ([member("a.img"), member("b.raw")], UnsupportedFormat, "more than one disk image"),
])
def test_hostile_tars(members: list[tarfile.TarInfo], error: type[UserError], match: str, work: Path,
                      tmp_path: Path) -> None:
    image = make_tar(tmp_path / "bad.tar", members)
    refused(image, tmp_path, error, match)


def test_a_link_after_the_disk_member_fails_the_create(work: Path, tmp_path: Path) -> None:
    image = make_tar(tmp_path / "late.tar", [member("disk.raw"), member("x", tarfile.SYMTYPE, "/etc/shadow")])
    refused(image, tmp_path, UnsafeImage, "symbolic link")


def test_local_path_with_dotdot_and_symlink_escape(work: Path, secret: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    disk = new_disk(tmp_path / "disk.img", 40 * MiB)
    (allowed / "escape.raw").symlink_to(secret)
    for image, match in ((allowed / ".." / secret.name, "must not contain '..'"),
                         (allowed / "escape.raw", "outside the allowed image directories")):
        proc = cli_create(tmp_path / image.name, image, disk, allowed)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and match in errors[0], proc.stderr
        assert not contains(disk, SECRET)


def test_good_image_next_to_the_corpus_still_works(work: Path, tmp_path: Path) -> None:
    src = make_raw_disk(work / "good.raw", DISK)
    disk = new_disk(tmp_path / "disk", DISK)
    deploy(qemu_convert(src, work / "good.qcow2", "qcow2"), disk)
    compare(disk, src)


def test_uncompressed_raw_larger_than_the_disk(work: Path, tmp_path: Path) -> None:
    image = new_disk(work / "large.raw", DISK + MiB)
    for local in (False, True):
        message = refused(image, tmp_path, ImageTooLarge, "larger than the disk", local=local)
        assert f"{DISK + MiB} bytes" in message and f"{DISK} bytes" in message
