"""Untrusted images through the installed create, import and rename scripts, under strace: not one
mount-family system call and no tool that parses a guest filesystem in the kernel, for GPT and MBR
disks with ext4, xfs and btrfs roots.  The seed partition is read back by Debian's cloud-init, grown
around by the real growpart, and updated by import (new MACs) and rename."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.ganeti.env import Script
from instance_cloudimage.ganeti.simulate import SimulatedTransfer
from instance_cloudimage.runtime.siteconfig import Paths
from tests.conftest import need_root, need_tools
from tests.support import delivery_helpers as dh
from tests.support import guest_images as gi

pytestmark = pytest.mark.integration
M = 1024 * 1024
MOUNT_CALLS = ("mount", "umount2", "fsopen", "fsconfig", "fsmount", "move_mount", "open_tree", "mount_setattr")
# Tools that attach or parse a guest filesystem in the kernel (blkid -p and mtools read in userspace).
KERNEL_FS_TOOLS = {"mount", "umount", "losetup", "e2fsck", "fsck", "resize2fs", "xfs_growfs", "xfs_repair",
                   "btrfs"}
USER_DATA = "#cloud-config\nruncmd: [[touch, /root/untrusted-ok]]\n"
NEW_MAC = "aa:00:00:5e:ee:01"
NEW_UUID = "5f0c6a1e-3b7d-4c2a-9d8e-2a1b3c4d5e6f"
LAYOUTS = [("gpt", "ext4"), ("gpt", "xfs"), ("gpt", "btrfs"), ("dos", "ext4"), ("dos", "xfs"), ("dos", "btrfs")]


@pytest.fixture(autouse=True)
def tools() -> None:
    need_root()
    need_tools("strace", "growpart", "sfdisk", "sgdisk", "mkfs.vfat", "mcopy", "qemu-img")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(config dir, installed OS directory, the allowed image directory)."""
    base = tmp_path_factory.mktemp("untrusted")
    etc, images = base / "etc", base / "images"
    images.mkdir()
    dh.make_variant(etc)
    dh.make_variant(etc, agent="flamingo", name="flam")
    (etc / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {images}\n")
    os_dir = base / "os" / "cloudimage"
    install_os(os_dir, Paths(etc, base / "cache"))
    return etc, os_dir, images


def make_image(images: Path, label: str, fstype: str) -> Path:
    raw = images / f"{label}-{fstype}.raw"
    if label == "gpt":
        gi.gpt_root_first(raw, fstype, size_mib=160)
    else:
        gi.mbr_primary_root(raw, fstype, size_mib=160)
    image = raw.with_suffix(".qcow2")
    gi.sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(image))
    raw.unlink()
    return image


def traced(argv: list[str], env: Mapping[str, str], log: Path, cwd: Path,
           stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` under strace -f, recording execve and every mount-family call into ``log``."""
    trace = ",".join(("execve", *MOUNT_CALLS))
    return subprocess.run(["strace", "-f", "-qq", "-e", "signal=none", "-e", f"trace={trace}", "-o", os.fspath(log),
                           *argv], env=dict(env), cwd=cwd, stdin=stdin, capture_output=True, text=True, check=False)


def kernel_fs_use(log: Path) -> list[str]:
    """The mount-family calls and kernel-filesystem tools in an strace log."""
    found = []
    for line in log.read_text().splitlines():
        call = re.match(r"^\d+\s+(\w+)\(", line)
        if call is None:
            continue
        if call.group(1) in MOUNT_CALLS:
            found.append(line)
        elif call.group(1) == "execve" and (exe := re.search(r'execve\("([^"]+)"', line)):
            if os.path.basename(exe.group(1)) in KERNEL_FS_TOOLS and "= 0" in line:
                found.append(line)
    return found


def create(os_dir: Path, tmp_path: Path, image: Path, disks: list[Path], **params: str) -> tuple[int, str, list[str]]:
    env = dh.environ(disks, params={"image": os.fspath(image), "ssh_authorized_keys": dh.KEY,
                                    "user_data": USER_DATA, **params}, nics=1)
    log = tmp_path / "create.strace"
    proc = traced([os.fspath(os_dir / "create")], env, log, os_dir)
    return proc.returncode, proc.stderr, kernel_fs_use(log)


@pytest.mark.parametrize(("label", "fstype"), LAYOUTS)
def test_untrusted_create_import_and_rename_never_mount(tmp_path: Path, site: tuple[Path, Path, Path], label: str,
                                                        fstype: str) -> None:
    _, os_dir, images = site
    image = make_image(images, label, fstype)
    disk = gi.blank(tmp_path / "disk0.img", 320)
    rc, err, used = create(os_dir, tmp_path, image, [disk])
    assert rc == 0, err
    assert used == [], "\n".join(used)
    assert "image trust: untrusted (named by the image parameter); its filesystems are never mounted" in err
    assert "seed delivery: nocloud-partition" in err
    offset, size, fs_label = dh.seed_partition_of(disk)
    assert fs_label == "CIDATA" and offset + size <= 320 * M and 320 * M - (offset + size) < 2 * M

    seen = dh.read_seed_partition(disk, "nocloud")
    assert seen["claimed"] and seen["fqdn"] == "vm1.example.org" and seen["hostname"] == "vm1"
    assert seen["public_keys"] == [dh.KEY]
    assert seen["merged"]["runcmd"] == [["touch", "/root/untrusted-ok"]]
    assert [(i["name"], i["mac_address"]) for i in seen["network"]["interfaces"]] == [("eth0", "aa:00:00:00:00:00")]

    # gnt-backup export, then import with a new MAC and UUID: only the seed partition changes.
    exported = tmp_path / "export.stream"
    with open(exported, "wb") as out:
        exp = dh.environ([disk], params={"image": os.fspath(image)}, nics=1,
                         transfer=SimulatedTransfer(Script.EXPORT, 0, device=disk))
        subprocess.run([os_dir / "export"], env=exp, cwd=os_dir, stdout=out, stdin=subprocess.DEVNULL, check=True)
    imported = gi.blank(tmp_path / "imported.img", 320)
    env = dh.environ([imported], params={"image": os.fspath(image)}, nics=[NEW_MAC], instance_uuid=NEW_UUID,
                     transfer=SimulatedTransfer(Script.IMPORT, 0))
    with open(exported, "rb") as stdin:
        proc = traced([os.fspath(os_dir / "import")], env, tmp_path / "import.strace", os_dir, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert kernel_fs_use(tmp_path / "import.strace") == []
    assert f"network configuration now for MAC {NEW_MAC}" in proc.stderr
    after = dh.read_seed_partition(imported, "nocloud")
    assert [i["mac_address"] for i in after["network"]["interfaces"]] == [NEW_MAC]
    assert after["instance_id"] == NEW_UUID and after["public_keys"] == [dh.KEY]
    assert after["userdata_raw"] == seen["userdata_raw"]
    old, new = disk.read_bytes(), imported.read_bytes()
    assert old[:offset] == new[:offset] and old[offset + size:] == new[offset + size:]
    assert old[offset:offset + size] != new[offset:offset + size]

    # Rename: the seed partition gets the new name, and nothing is mounted.
    env = dh.environ([imported], name="vm2.example.org", old_name="vm1.example.org", nics=[NEW_MAC],
                     instance_uuid=NEW_UUID, params={"image": os.fspath(image)})
    proc = traced([os.fspath(os_dir / "rename")], env, tmp_path / "rename.strace", os_dir)
    assert proc.returncode == 0, proc.stderr
    assert kernel_fs_use(tmp_path / "rename.strace") == []
    renamed = dh.read_seed_partition(imported, "nocloud")
    assert renamed["fqdn"] == "vm2.example.org" and renamed["instance_id"] == NEW_UUID
    assert "disk 0: 1 seed file(s) now carry the name vm2.example.org" in proc.stderr

    # cloud-init's growpart at first boot: the root grows right up to the seed partition.
    gi.sh("growpart", os.fspath(imported), "1")
    root = gi.partition_offsets(imported)[1]
    assert root[0] + root[1] == dh.seed_partition_of(imported)[0]


def test_config_drive_partition_is_read_by_cloud_init(tmp_path: Path, site: tuple[Path, Path, Path]) -> None:
    _, os_dir, images = site
    image = make_image(images, "gpt", "ext4")
    disk = gi.blank(tmp_path / "disk0.img", 256)
    rc, err, used = create(os_dir, tmp_path, image, [disk], seed="configdrive-partition")
    assert rc == 0 and used == [], err
    assert dh.seed_partition_of(disk)[2] == "config-2"
    seen = dh.read_seed_partition(disk, "configdrive")
    assert seen["claimed"] and seen["dsname"] == "ConfigDrive" and seen["fqdn"] == "vm1.example.org"
    assert seen["public_keys"] == [dh.KEY]
    assert seen["merged"]["runcmd"] == [["touch", "/root/untrusted-ok"]]
    assert [i["mac_address"] for i in seen["network"]["interfaces"]] == ["aa:00:00:00:00:00"]


def test_untrusted_with_a_free_disk_1_uses_it(tmp_path: Path, site: tuple[Path, Path, Path]) -> None:
    _, os_dir, images = site
    image = make_image(images, "gpt", "ext4")
    disk, seed_disk = gi.blank(tmp_path / "disk0.img", 256), gi.blank(tmp_path / "disk1.img", 16)
    rc, err, used = create(os_dir, tmp_path, image, [disk, seed_disk])
    assert rc == 0 and used == [], err
    assert "seed delivery: nocloud-disk (untrusted image, disk 1 is free)" in err
    assert dh.read_fat_seed(seed_disk, "nocloud")["fqdn"] == "vm1.example.org"
    assert len(gi.partition_offsets(disk)) == 1  # no seed partition


def test_post_write_hooks_run_without_target(tmp_path: Path, site: tuple[Path, Path, Path]) -> None:
    etc, os_dir, images = site
    hooks = etc / "hooks.d" / "post-write.d"
    hooks.mkdir(parents=True, exist_ok=True)
    hook = hooks / "10-target"
    hook.write_text('#!/bin/sh\necho "TARGET=${TARGET:-unset}"\n')
    hook.chmod(0o755)
    try:
        image = make_image(images, "gpt", "ext4")
        disk = gi.blank(tmp_path / "disk0.img", 256)
        rc, err, used = create(os_dir, tmp_path, image, [disk])
    finally:
        hook.unlink()
    assert rc == 0 and used == [], err
    assert "post-write hooks run without the guest filesystem (TARGET is unset): the image is untrusted" in err
    assert "TARGET=unset" in err


@pytest.mark.parametrize(("params", "variant", "expected"), [
    ({"seed": "nocloud-fs"}, "test", "seed=nocloud-fs writes into the image's filesystem"),
    ({"grow_root": "yes"}, "test", "grow_root=yes grows the image's filesystem on this node"),
    ({}, "flam", "variant flam uses flamingo, which can only be configured inside the image's filesystem"),
])
def test_choices_that_need_a_mount_are_refused_in_one_line(tmp_path: Path, site: tuple[Path, Path, Path],
                                                           params: dict[str, str], variant: str, expected: str) -> None:
    _, os_dir, images = site
    image = make_image(images, "gpt", "ext4")
    disk = gi.blank(tmp_path / "d.img", 64)
    env = dh.environ([disk], params={"image": os.fspath(image), **params}, variant=variant)
    for script, argv in (("verify", ["parameters"]), ("create", [])):
        proc = subprocess.run([os_dir / script, *argv], env=env, cwd=os_dir, capture_output=True, text=True,
                              check=False)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert expected in last and "TrustedDirectories" in last, proc.stderr
    assert disk.read_bytes() == bytes(64 * M)  # refused before the disk was touched


def create_with_setting(tmp_path: Path, site: tuple[Path, Path, Path], setting: str,
                        label: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The OS create script on an image of the image parameter, with one more [Images] setting."""
    etc, os_dir, images = site
    conf = etc / "defaults.conf"
    saved = conf.read_text()
    conf.write_text(saved + setting + "\n")
    try:
        image = make_image(images, label, "ext4")
        disk = gi.blank(tmp_path / "disk0.img", 256)
        env = dh.environ([disk], params={"image": os.fspath(image)}, nics=1)
        proc = subprocess.run([os_dir / "create"], env=env, cwd=os_dir, capture_output=True, text=True, check=False)
    finally:
        conf.write_text(saved)
    return proc, disk


def test_a_trusted_directory_keeps_todays_behaviour(tmp_path: Path, site: tuple[Path, Path, Path]) -> None:
    proc, disk = create_with_setting(tmp_path, site, f"TrustedDirectories = {site[2]}", "gpt")
    assert proc.returncode == 0, proc.stderr
    assert "image trust: trusted (a local file in one of [Images] TrustedDirectories)" in proc.stderr
    assert "seed delivery: nocloud-fs (cloud-init agent)" in proc.stderr
    assert dh.read_nocloud_in_guest(disk)["fqdn"] == "vm1.example.org"
    assert len(gi.partition_offsets(disk)) == 1


def test_mount_untrusted_gives_back_todays_behaviour(tmp_path: Path, site: tuple[Path, Path, Path]) -> None:
    proc, disk = create_with_setting(tmp_path, site, "MountUntrusted = yes", "dos")
    assert proc.returncode == 0, proc.stderr
    assert "image trust: untrusted (named by the image parameter); mounted all the same" in proc.stderr
    assert "seed delivery: nocloud-fs (cloud-init agent)" in proc.stderr
    assert dh.read_nocloud_in_guest(disk)["fqdn"] == "vm1.example.org"
