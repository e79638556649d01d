"""flamingo on a real disk: a CentOS-like guest checked file by file after create, rename and import.

The guest tree of test_flamingo.py becomes an ext4 filesystem image (mke2fs -d keeps its modes
and owners); create's delivery step seeds it, the rename verb renames it, and the installed
export and import scripts move it onto a new disk under new NICs.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.ganeti.env import Script
from instance_cloudimage.ganeti.simulate import SimulatedTransfer
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig
from instance_cloudimage.verbs.rename import run_rename
from tests.seed.test_flamingo import HASH, KEY, USER_DATA, build_tree, check_guest
from tests.support import delivery_helpers as dh
from tests.support import guest_images as gi

pytestmark = pytest.mark.integration
PARAMS = {"ssh_authorized_keys": KEY, "password_hash": HASH, "user_data": USER_DATA}


def centos_disk(path: Path) -> Path:
    """A bare ext4 filesystem image (no partition table) holding the CentOS-like tree."""
    with tempfile.TemporaryDirectory(prefix="flamingo-tree-") as tree:
        build_tree(Path(tree))
        gi.sh("mke2fs", "-q", "-F", "-t", "ext4", "-L", "cloudimg-rootfs", "-d", tree, os.fspath(path), "96M")
    return path


@contextmanager
def guest(img: Path) -> Iterator[Path]:
    with gi.loop(img) as dev, gi.mounted(dev) as root:
        yield root


def instance_id_of(img: Path) -> str:
    with guest(img) as root:
        return (root / "var/lib/instance-cloudimage/firstboot/instance-id").read_text().strip()


def test_create_rename_import_keep_every_file_right(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    variant = dh.make_variant(etc, agent="flamingo", name="flam")
    img = centos_disk(tmp_path / "disk0.img")
    drive = gi.blank(tmp_path / "disk1.img", 16)

    # create
    genv = dh.ganeti_env([img, drive], params=PARAMS, variant="flam")
    with ExitStack() as stack:
        plan = dh.deliver(genv, variant, stack)
    assert (plan.delivery, plan.flamingo) == ("configdrive-disk", True)
    instance_id = instance_id_of(img)
    assert instance_id == dh.INSTANCE_UUID
    with guest(img) as root:
        check_guest(root, instance_id)

    # rename: only /etc/hostname changes
    run_rename(dh.ganeti_env([img, drive], Script.RENAME, name="vm2.example.org", old_name="vm1.example.org",
                             variant="flam"), SiteConfig())
    with guest(img) as root:
        check_guest(root, instance_id, hostname="vm2.example.org")

    # import under new NICs and a new UUID: the guest's files (and the instance-id the first-boot
    # unit compares with) do not depend on them, so they come through unchanged.
    os_dir = tmp_path / "os" / "cloudimage"
    install_os(os_dir, Paths(etc, tmp_path / "cache"))
    new = tmp_path / "imported0.img"
    new_drive = tmp_path / "imported1.img"
    new_drive.touch()
    env = {"macs": ["aa:00:00:5e:ee:01"], "instance_uuid": "5f0c6a1e-3b7d-4c2a-9d8e-2a1b3c4d5e6f"}
    export_then_import(os_dir, img, new, [new, new_drive], **env)
    assert gi.no_loops(img) and gi.our_mounts(img, new) == []
    with guest(new) as root:
        check_guest(root, instance_id, hostname="vm2.example.org")


def export_then_import(os_dir: Path, src: Path, dst: Path, disks: list[Path], *, macs: list[str],
                       instance_uuid: str) -> None:
    """The installed export script on ``src`` piped into the installed import script onto ``dst``."""
    def env(script: Script, device: Path | None) -> dict[str, str]:
        return dh.environ(disks, name="vm2.example.org", nics=macs, variant="flam", instance_uuid=instance_uuid,
                          transfer=SimulatedTransfer(script, 0, device=device))

    with open(dst, "wb") as f:
        f.truncate(src.stat().st_size)
    exported = subprocess.run([os_dir / "export"], env=env(Script.EXPORT, src), cwd=os_dir, capture_output=True,
                              stdin=subprocess.DEVNULL, check=True).stdout
    proc = subprocess.run([os_dir / "import"], env=env(Script.IMPORT, None), cwd=os_dir, input=exported,
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
