"""A first run as a new user would try it: not root, a typo, a disk too small, --debug in the
wrong place, --help.  Each ends in one line that says what to do, and leaves no disk file
behind that the command made."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from instance_cloudimage.cli.main import build_parser
from instance_cloudimage.disk.convert import check_fits
from instance_cloudimage.disk.write import DiskTarget
from instance_cloudimage.ganeti.simulate import SimulatedDisk, simulated_environment
from instance_cloudimage.runtime.errors import DiskTooSmall
from tests.cli.test_cli import assert_one_line_error
from tests.cli.test_cli_docs import subparsers
from tests.conftest import Site, cli, need_tools


def assert_ends_in_error(r: subprocess.CompletedProcess[str], phrase: str) -> None:
    """Progress lines, then one error line: for failures after the create got going."""
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("instance-cloudimage: error: ") and phrase in last, r.stderr


NOT_ROOT = "not running as root, and this create mounts the guest's filesystem"
DRIVER = Path(__file__).resolve().parents[1] / "support" / "create_driver.py"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory an unprivileged user can work in (pytest's tmp_path is root's own, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="first-run-"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d)


def cli_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user who is not root: 'nobody' when the tests run as root (CI)."""
    if os.geteuid() != 0:
        return cli(*args)
    need_nobody()
    return cli(*args, as_user="nobody")


def need_nobody() -> None:
    """'nobody' must reach this Python and the checkout (not so under a 0700 home directory)."""
    need_tools("setpriv")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            f"import instance_cloudimage; open({os.fspath(DRIVER)!r}).close()"],
                           capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run {sys.executable} or read the checkout: {probe.stderr.strip()[-200:]}")


def unprivileged_site(shared: Path) -> list[str]:
    config = shared / "etc"
    config.mkdir()
    (config / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {shared}\n")
    cache = shared / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    return ["--config-dir", os.fspath(config), "--cache-dir", os.fspath(cache)]


def test_not_root_is_refused_before_any_download(shared: Path) -> None:
    disk = shared / "disk.img"
    r = cli_unprivileged("create", "--disk", os.fspath(disk), *unprivileged_site(shared))
    assert_one_line_error(r, NOT_ROOT)
    assert "seed=auto writes the cloud-init seed into the guest's filesystem" in r.stderr
    assert "(run it as root, or set seed=none)" in r.stderr
    assert not disk.exists()  # made by the command, removed again
    assert list((shared / "cache").iterdir()) == []  # nothing fetched, nothing built


@pytest.mark.parametrize(("params", "why"), [
    (["-O", "seed=nocloud-fs"], "seed=nocloud-fs writes the cloud-init seed"),
    (["-O", "seed=none", "-O", "grow_root=yes"], "grow_root grows the root filesystem"),
])
def test_not_root_names_what_needs_root(shared: Path, params: list[str], why: str) -> None:
    r = cli_unprivileged("create", "--disk", os.fspath(shared / "disk.img"), *params, *unprivileged_site(shared))
    assert_one_line_error(r, NOT_ROOT)
    assert why in r.stderr


def test_not_root_with_a_cache_it_cannot_write(shared: Path) -> None:
    """The default cache is root's: said at the start, not as a traceback after the download."""
    args = unprivileged_site(shared)
    locked = shared / "root-cache"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)  # nobody (or this user) may not create the cache inside
    args[-1] = os.fspath(locked / "cache")
    r = cli_unprivileged("create", "--disk", os.fspath(shared / "disk.img"), "-O", "seed=none", *args)
    assert_one_line_error(r, f"the image cache {locked / 'cache'} is not writable by this user")
    assert "--cache-dir" in r.stderr
    assert not (shared / "disk.img").exists()


def test_not_root_onto_a_file_without_a_seed_works(shared: Path) -> None:
    """Writing the image onto a file needs no root: only mounting the guest does."""
    need_tools("qemu-img", "sfdisk", "mke2fs")
    disk = shared / "disk.img"
    r = cli_unprivileged("create", "--disk", os.fspath(disk), "-O", "seed=none", *unprivileged_site(shared))
    assert r.returncode == 0, r.stderr
    assert "instance demo.example.org installed" in r.stderr
    with open(disk, "rb") as f:
        f.seek(512)
        assert f.read(8) == b"EFI PART"  # the demo image's GPT header, on the disk


def test_unknown_variant_suggests_the_closest_name(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    r = cli("create", "--disk", os.fspath(disk), "--variant", "debain-12", *site.cli_args())
    assert_one_line_error(r, "unknown variant 'debain-12' (did you mean debian-12? "
                             "'instance-cloudimage variants' lists them all)")
    assert not disk.exists()
    r = cli("create", "--disk", os.fspath(disk), "--variant", "zzzzzz", *site.cli_args())
    assert_one_line_error(r, "unknown variant 'zzzzzz' ('instance-cloudimage variants' lists them all)")


def test_disk_too_small_says_which_disk_size(site: Site, tmp_path: Path) -> None:
    need_tools("qemu-img", "sfdisk", "mke2fs")
    disk = tmp_path / "disk.img"
    r = cli("create", "--disk", os.fspath(disk), "--disk-size", "64M", "-O", "seed=none", *site.cli_args())
    assert_ends_in_error(r, "is larger than the disk, 64.0 MiB (67108864 bytes) "
                             "(give a larger --disk-size of at least 128M)")
    assert not disk.exists()


def test_a_disk_the_command_did_not_make_is_kept(site: Site, tmp_path: Path) -> None:
    need_tools("qemu-img", "sfdisk", "mke2fs")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"mine" * 1024)
    os.truncate(disk, 16 * 1024 * 1024)
    r = cli("create", "--disk", os.fspath(disk), "-O", "seed=none", *site.cli_args())
    assert_ends_in_error(r, "(give --disk a larger file or device of at least 128M, or a new file name "
                             "and --disk-size)")
    assert disk.read_bytes()[:4096] == b"mine" * 1024 and disk.stat().st_size == 16 * 1024 * 1024


def test_the_os_scripts_disk_too_small_speaks_of_disk_0(tmp_path: Path) -> None:
    """Ganeti's create has no --disk-size: its hint names the instance's disk."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(DiskTooSmall) as e:
            check_fits(2 * 1024 * 1024, DiskTarget(os.fspath(tmp_path), fd, 1024 * 1024, False, True))
    finally:
        os.close(fd)
    assert e.value.hint == "create the instance with a larger disk 0" and "--disk-size" not in str(e.value)
    assert e.value.needed == 2 * 1024 * 1024


def test_debug_is_accepted_after_the_subcommand(site: Site, tmp_path: Path) -> None:
    assert cli("variants", "--debug", *site.cli_args()).returncode == 0
    for where in (["--debug", "create"], ["create", "--debug"]):
        r = cli(*where, "--disk", os.fspath(tmp_path / "d.img"), "--variant", "nosuch", *site.cli_args())
        assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr  # --debug keeps tracebacks
    r = cli("create", "--disk", os.fspath(tmp_path / "d.img"), "--variant", "nosuch", *site.cli_args())
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", sorted(subparsers(build_parser())))
def test_every_subcommand_help_has_a_description_and_an_example(name: str) -> None:
    r = cli(name, "--help")
    assert r.returncode == 0
    sub = subparsers(build_parser())[name]
    assert sub.description and len(sub.description) > 40
    examples = r.stdout.split("examples:\n", 1)[1]
    assert f"instance-cloudimage {name}" in examples
    assert "worker" not in r.stdout.lower()


def test_variants_json(site: Site) -> None:
    r = cli("variants", "--json", *site.cli_args())
    assert r.returncode == 0, r.stderr
    variants = {v["name"]: v for v in json.loads(r.stdout)}
    assert set(variants["debian-12"]) == {"name", "description", "agent", "seed", "architectures"}
    assert variants["demo"]["agent"] == "cloud-init" and variants["demo"]["architectures"] == ["x86_64", "aarch64"]
    plain = cli("variants", *site.cli_args()).stdout.splitlines()
    assert [line.split()[0] for line in plain] == list(variants)


def test_the_os_script_refuses_a_create_without_root_too(shared: Path) -> None:
    """Ganeti runs its scripts as root; one run by hand as another user says so at its start."""
    if os.geteuid() == 0:
        need_nobody()
    disk = shared / "disk0"
    with open(disk, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    disk.chmod(0o666)
    env = simulated_environment("demo", [SimulatedDisk(disk, size_mib=64)])
    user = [] if os.geteuid() != 0 else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run([*user, sys.executable, os.fspath(DRIVER), "create", os.fspath(shared / "os" / "create")],
                       env=env, capture_output=True, text=True, cwd="/")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"cloudimage create: error: {NOT_ROOT} (loop devices and mount need root): seed=auto writes the "
        "cloud-init seed into the guest's filesystem (run it as root, or set seed=none)")
    assert disk.read_bytes() == bytes(64 * 1024 * 1024)  # Ganeti's disk: untouched, and kept


def test_not_root_with_an_untrusted_image_seeds_a_partition(shared: Path) -> None:
    """An untrusted image is never mounted, so its seed partition needs no root either."""
    need_tools("qemu-img", "sfdisk", "sgdisk", "mkfs.vfat", "mcopy", "mke2fs")
    from instance_cloudimage.sources.demo import build_demo_image

    image = shared / "untrusted.qcow2"
    shutil.copyfile(build_demo_image("demo", shared / "build"), image)
    image.chmod(0o644)
    disk = shared / "disk.img"
    r = cli_unprivileged("create", "--disk", os.fspath(disk), "--disk-size", "256M", "-O", f"image={image}",
                         *unprivileged_site(shared))
    assert r.returncode == 0, r.stderr
    assert "image trust: untrusted" in r.stderr and "seed delivery: nocloud-partition" in r.stderr
