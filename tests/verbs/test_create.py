"""The create pipeline end to end with the real qemu-img, on images the tests make."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Site, cli, need_tools, qemu_img

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_tools("qemu-img", "sfdisk", "mke2fs")


def make_raw(path: Path, size_mib: int = 16) -> Path:
    """A sparse raw image with a few non-zero islands (random data, a text marker)."""
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
        f.seek(0)
        f.write(os.urandom(64 * 1024))
        f.seek(size_mib * 1024 * 1024 // 3 + 123)
        f.write(b"MARKER" * 1000)
        f.seek(size_mib * 1024 * 1024 - 4096)
        f.write(os.urandom(4096))
    return path


def without_seed(site: Site) -> None:
    """For tests that compare the disk with the image byte for byte, or write images without a
    filesystem: a site override of the demo variant turns seeding off (test_seed.py covers it),
    and the shipped post-write hooks are masked, since mounting the guest rewrites its superblock."""
    from instance_cloudimage.runtime.resources import shipped_dir

    (site.config_dir / "variants").mkdir(exist_ok=True)
    (site.config_dir / "variants" / "demo.conf").write_text("[Variant]\nSeed = none\n")
    masks = site.config_dir / "hooks.d" / "post-write.d"
    masks.mkdir(parents=True, exist_ok=True)
    for hook in (shipped_dir("hooks.d") / "post-write.d").iterdir():
        (masks / hook.name).symlink_to("/dev/null")


def compare(disk: Path, image: Path, fmt: str) -> None:
    # -s: strict, so a disk larger than the image must be zero beyond the image's end.
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(disk), str(image)],
                   check=True, capture_output=True)


def test_demo_variant_creates_a_real_disk(site: Site, tmp_path: Path) -> None:
    without_seed(site)
    disk = tmp_path / "disk.img"
    r = cli("create", "--disk", str(disk), "--variant", "demo", *site.cli_args())
    assert r.returncode == 0, r.stderr
    assert "instance demo.example.org installed" in r.stderr
    (demo,) = (site.cache_dir / "builtin").glob("demo-*.qcow2")
    compare(disk, demo, "qcow2")
    table = subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True, check=True).stdout
    assert '"label": "gpt"' in table
    # nothing is left in the scratch directory (a root-only local image needs none at all)
    scratch = site.cache_dir / "tmp"
    assert not scratch.exists() or list(scratch.iterdir()) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_image_parameter_with_raw_and_qcow2(site: Site, tmp_path: Path, fmt: str) -> None:
    without_seed(site)
    raw = make_raw(site.images / "src.raw")
    image = raw
    if fmt == "qcow2":
        image = site.images / "src.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\xff" * 4096)  # stale bytes in a region that is zero in the image
    os.truncate(disk, 32 * 1024 * 1024)
    r = cli("create", "--disk", str(disk), "-O", f"image={image}", *site.cli_args())
    assert r.returncode == 0, r.stderr
    compare(disk, image, fmt)
    assert disk.stat().st_size == 32 * 1024 * 1024  # a Ganeti file disk never grows


def test_checksum_parameter_is_enforced(site: Site, tmp_path: Path) -> None:
    without_seed(site)
    raw = make_raw(site.images / "src.raw", 4)
    import hashlib

    good = "sha256:" + hashlib.sha256(raw.read_bytes()).hexdigest()
    disk = tmp_path / "disk.img"
    r = cli("create", "--disk", str(disk), "-O", f"image={raw}", "-O", f"image_checksum={good}", *site.cli_args())
    assert r.returncode == 0, r.stderr
    bad = "sha256:" + "0" * 64
    r = cli("create", "--disk", str(disk), "-O", f"image={raw}", "-O", f"image_checksum={bad}", *site.cli_args())
    assert r.returncode == 1
    assert "does not match its sha256 checksum" in r.stderr
    assert "Traceback" not in r.stderr


def test_image_larger_than_disk_names_both_sizes(site: Site, tmp_path: Path) -> None:
    image = site.images / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "64M")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:  # the user's disk file, not one the command makes (and removes on failure)
        f.truncate(32 * 1024 * 1024)
    r = cli("create", "--disk", str(disk), "-O", f"image={image}", *site.cli_args())
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "64.0 MiB (67108864 bytes)" in last and "32.0 MiB (33554432 bytes)" in last
    assert disk.stat().st_size == 32 * 1024 * 1024
    assert disk.read_bytes().count(0) == 32 * 1024 * 1024  # untouched


def test_qcow2_with_backing_file_never_leaks_host_data(site: Site, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.bin"
    secret.write_bytes(b"TOP-SECRET-HOST-DATA" * 100)
    image = site.images / "gadget.qcow2"
    qemu_img("create", "-f", "qcow2", "-u", "-b", str(secret), "-F", "raw", str(image), "1M")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * 1024 * 1024))  # given, so that the failed create leaves it to be read
    r = cli("create", "--disk", str(disk), "-O", f"image={image}", *site.cli_args())
    assert r.returncode == 1
    assert "backing file" in r.stderr.strip().splitlines()[-1]
    assert b"TOP-SECRET" not in disk.read_bytes()


def test_declared_format_must_match_content(site: Site, tmp_path: Path) -> None:
    raw = make_raw(site.images / "src.raw", 4)
    (site.config_dir / "variants").mkdir()
    (site.config_dir / "variants" / "local.conf").write_text(
        f"[Variant]\nDescription = local\n[Image]\nURL = {raw}\nFormat = qcow2\n")
    disk = tmp_path / "disk.img"
    r = cli("create", "--disk", str(disk), "--variant", "local", *site.cli_args())
    assert r.returncode == 1
    assert "declared as qcow2 but its content is raw" in r.stderr


def test_bad_option_and_unknown_variant_fail_cleanly(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    r = cli("create", "--disk", str(disk), "--variant", "nosuch", *site.cli_args())
    assert r.returncode == 1 and "unknown variant 'nosuch'" in r.stderr
    r = cli("create", "--disk", str(disk), "-O", "novalue", *site.cli_args())
    assert r.returncode == 1 and "-O expects name=value" in r.stderr
    assert "Traceback" not in r.stderr


def test_seed_inputs_are_checked_before_any_work(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    r = cli("create", "--disk", str(disk), "--disk-size", "8M", "--instance-name", "bad_name!", *site.cli_args())
    assert r.returncode == 1
    assert "is not a valid host name" in r.stderr.strip().splitlines()[-1]
    assert not (site.cache_dir / "builtin").exists()  # nothing was fetched or built
    assert not disk.exists()  # the command made it and removed it again: nothing was written
