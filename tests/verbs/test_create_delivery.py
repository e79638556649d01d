"""The real create script (installed OS definition, Ganeti environment, built-in demo image) with
growth and seeding, and what it leaves behind on success, failure and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.runtime.siteconfig import Paths
from tests.support import delivery_helpers as dh
from tests.support import guest_images as gi

pytestmark = pytest.mark.integration
DRIVER = Path(__file__).resolve().parents[1] / "support" / "create_driver.py"
M = 1024 * 1024


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the demo image is built once for the module


@pytest.fixture()
def os_dir(tmp_path: Path, cache_dir: Path) -> Path:
    config = tmp_path / "etc"
    dh.make_variant(config, agent="cloud-init")
    # Trusted: the hostile image below is to reach nocloud-fs, which only a trusted image gets.
    (config / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {tmp_path / 'images'}\n"
                                          f"TrustedDirectories = {tmp_path / 'images'}\n")
    (tmp_path / "images").mkdir()
    install_os(tmp_path / "os", Paths(config, cache_dir), python=sys.executable)
    return tmp_path / "os"


def start(os_dir: Path, disks: list[Path], pause: str | None = None, verb: str = "create",
          **params: str) -> subprocess.Popen[bytes]:
    env = dh.environ(disks, params=params, nics=1)
    if pause:
        env["TEST_PAUSE_AFTER"] = pause
    return subprocess.Popen([sys.executable, os.fspath(DRIVER), verb, os.fspath(os_dir / verb)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os_dir)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode()


def assert_nothing_left(disk: Path) -> None:
    assert gi.no_loops(disk), "a loop device is still attached"
    assert gi.our_mounts(disk) == [], "a guest filesystem is still mounted"


def test_create_grows_and_seeds(os_dir: Path, tmp_path: Path) -> None:
    disk = gi.blank(tmp_path / "disk0.img", 320)
    rc, err = finish(start(os_dir, [disk], grow_root="yes"))
    assert rc == 0, err
    assert "seed delivery: nocloud-fs (cloud-init agent)" in err
    start_, size = gi.partition_offsets(disk)[1]
    assert 320 * M - (start_ + size) < M  # grown to the end of the disk
    result = dh.read_nocloud_in_guest(disk)
    assert result["claimed"] and result["fqdn"] == "vm1.example.org"
    assert result["instance_id"] and result["instance_id"] != "nocloud"
    assert_nothing_left(disk)


@pytest.mark.parametrize("pause", ["disk.mount.mount_device", "disk.mount.attach_loop", "disk.grow.attach_loop"])
def test_sigterm_mid_way_leaves_nothing_attached(os_dir: Path, tmp_path: Path, pause: str) -> None:
    disk = gi.blank(tmp_path / "disk0.img", 320)
    proc = start(os_dir, [disk], pause=pause, grow_root="yes")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"READY\n", proc.stderr.read().decode() if proc.stderr else ""
    assert gi.loops_of(disk) != ""  # caught while something really is attached
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 130, err
    assert "interrupted" in err
    assert_nothing_left(disk)


def test_failure_after_mounting_leaves_nothing_attached(os_dir: Path, tmp_path: Path) -> None:
    host = tmp_path / "host-dir"
    host.mkdir()
    raw = gi.hostile(tmp_path / "hostile.raw", {"var/lib/cloud": os.fspath(host)})
    image = tmp_path / "images" / "hostile.qcow2"
    gi.sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(image))
    disk = gi.blank(tmp_path / "disk0.img", 128)
    rc, err = finish(start(os_dir, [disk], image=os.fspath(image)))
    assert rc == 1, err
    assert "/var/lib/cloud is a symbolic link" in err
    assert list(host.iterdir()) == []
    assert_nothing_left(disk)


def test_rename_script_updates_the_seed(os_dir: Path, tmp_path: Path) -> None:
    disk = gi.blank(tmp_path / "disk0.img", 256)
    rc, err = finish(start(os_dir, [disk]))
    assert rc == 0, err
    env = dh.environ([disk], name="vm2.example.org", old_name="vm1.example.org")
    proc = subprocess.run([sys.executable, os.fspath(DRIVER), "rename", os.fspath(os_dir / "rename")],
                          env=env, capture_output=True, check=False, cwd=os_dir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert dh.read_nocloud_in_guest(disk)["fqdn"] == "vm2.example.org"
    assert_nothing_left(disk)
