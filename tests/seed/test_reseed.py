"""reseed: after an import the seed describes the instance's new NICs; the instance-id changes iff needed.

Disks are seeded through create's delivery step, exported with the installed export script and
imported with the installed import script under another NIC environment (what
``gnt-backup import --net 0:mac=generate`` passes); the result is read back with Debian's real
cloud-init.  The decisions themselves are unit-tested in test_reseedplan.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.disk.mount import mount_guest_root
from instance_cloudimage.ganeti.env import Script, parse_environment
from instance_cloudimage.ganeti.simulate import SimulatedDisk, SimulatedTransfer
from instance_cloudimage.runtime.siteconfig import Paths
from instance_cloudimage.seed.reseedplan import macs_in
from tests.support import delivery_helpers as dh
from tests.support import guest_images as gi

OLD_UUID = dh.INSTANCE_UUID
NEW_UUID = "5f0c6a1e-3b7d-4c2a-9d8e-2a1b3c4d5e6f"
OLD_MACS = ("aa:00:00:00:00:00", "aa:00:00:00:00:01")
NEW_MAC = "aa:00:00:5e:ee:01"
NAME = "vm1.example.org"


def env_of(disks: Sequence[Path | SimulatedDisk], *, macs: Sequence[str] = OLD_MACS, instance_uuid: str = OLD_UUID,
           name: str = NAME, params: Mapping[str, str] | None = None, variant: str = "test",
           index: int | None = None, export_device: Path | None = None) -> dict[str, str]:
    """A create; with ``index`` the import of that disk, or with ``export_device`` too its export
    (read from there)."""
    transfer = None if index is None else SimulatedTransfer(Script.IMPORT if export_device is None else Script.EXPORT,
                                                            index, device=export_device)
    return dh.environ(disks, name=name, params=params, nics=macs, variant=variant, instance_uuid=instance_uuid,
                      transfer=transfer)


# --- the import script on seeded disks (integration) ---------------------------------------------------

@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config dir with the variants test and flam, installed OS directory)."""
    base = tmp_path_factory.mktemp("reseed")
    etc = base / "etc"
    dh.make_variant(etc)
    dh.make_variant(etc, agent="flamingo", name="flam")
    os_dir = base / "os" / "cloudimage"
    install_os(os_dir, Paths(etc, base / "cache"))
    return etc, os_dir


def create(etc: Path, disks: list[Path], variant: str = "test", **params: str) -> None:
    v = dh.make_variant(etc, agent="flamingo" if variant == "flam" else "cloud-init", name=variant)
    genv = parse_environment(env_of(disks, params=params or None, variant=variant), Script.CREATE)
    with ExitStack() as stack:
        dh.deliver(genv, v, stack)


def export_then_import(os_dir: Path, src: Path, dst: Path, disks: Sequence[Path], index: int,
                       **instance: Any) -> subprocess.CompletedProcess[str]:
    """The installed export script on ``src``, its stream into the installed import script onto ``dst``,
    disk ``index`` of ``disks``; both with env_of(disks, **instance)."""
    exp = env_of(disks, index=index, export_device=src, **instance)
    env = env_of(disks, index=index, **instance)
    with open(dst, "wb") as f:
        f.truncate(src.stat().st_size)
    stream = dst.with_suffix(".stream")
    with open(stream, "wb") as out:
        subprocess.run([os_dir / "export"], env=exp, cwd=os_dir, stdout=out, stdin=subprocess.DEVNULL, check=True)
    with open(stream, "rb") as stdin:
        proc = subprocess.run([os_dir / "import"], env=env, cwd=os_dir, stdin=stdin, capture_output=True, text=True,
                              check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def nocloud_dir_of(img: Path, dest: Path) -> Path:
    """A copy of the NoCloud directory in the guest of ``img`` (mounted read-only)."""
    with ExitStack() as stack:
        mounted = mount_guest_root(os.fspath(img), stack, arch="x86_64", read_only=True)
        shutil.copytree(mounted.path / "var/lib/cloud/seed/nocloud", dest)
    return dest


def boot(kind: str, seed_dir: Path, guest_state: Path) -> dict[str, Any]:
    """One boot's init-local stage of Debian's cloud-init on ``seed_dir``; ``guest_state`` is the
    guest's /var/lib/cloud, kept from boot to boot (tests/cloudinit_reader.py simulate_boot)."""
    proc = subprocess.run([dh.CLOUDINIT_PYTHON, os.fspath(dh.READER), f"boot-{kind}", os.fspath(seed_dir),
                           os.fspath(guest_state)], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def applied_macs(booted: dict[str, Any]) -> list[str] | None:
    cfg = booted["applied"]
    if cfg is None:
        return None
    return list(macs_in(json.dumps(cfg).encode()))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_import_with_new_macs_rewrites_the_nocloud_dir(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    etc, os_dir = installed
    src = gi.gpt_root_first(tmp_path / "disk0.img")
    create(etc, [src], ssh_authorized_keys=dh.KEY, user_data="#cloud-config\nruncmd: [[touch, /root/ud]]\n")
    before = dh.read_nocloud_in_guest(src)
    guest = tmp_path / "guest-var-lib-cloud"
    first = boot("nocloud", nocloud_dir_of(src, tmp_path / "seed-before"), guest)
    assert first["new_instance"] and applied_macs(first) == list(OLD_MACS)
    dst = tmp_path / "imported.img"
    # gnt-backup import --net 0:mac=generate: one NIC, a new MAC, a new instance UUID; no secret user_data.
    proc = export_then_import(os_dir, src, dst, [dst], 0, macs=[NEW_MAC], instance_uuid=NEW_UUID,
                              params={"ssh_authorized_keys": dh.KEY})
    after = dh.read_nocloud_in_guest(dst)
    assert [(i["name"], i["mac_address"]) for i in before["network"]["interfaces"]] == \
        [("eth0", OLD_MACS[0]), ("eth1", OLD_MACS[1])]
    assert [(i["name"], i["mac_address"]) for i in after["network"]["interfaces"]] == [("eth0", NEW_MAC)]
    assert (before["instance_id"], after["instance_id"]) == (OLD_UUID, NEW_UUID)
    assert after["userdata_raw"] == before["userdata_raw"]  # the secret user-data survives, as the seed had it
    assert after["merged"]["runcmd"] == [["touch", "/root/ud"]]
    assert after["public_keys"] == [dh.KEY] and after["fqdn"] == NAME
    assert after["file_modes"] == before["file_modes"]
    assert f"network configuration now for MAC {NEW_MAC} (was {', '.join(OLD_MACS)})" in proc.stderr
    assert "cloud-init runs its per-instance modules again" in proc.stderr and "warning" not in proc.stderr.lower()
    assert gi.no_loops(dst) and gi.our_mounts(dst) == []
    # The guest that booted before the export applies the new network configuration at its next boot.
    second = boot("nocloud", nocloud_dir_of(dst, tmp_path / "seed-after"), guest)
    assert (second["new_instance"], second["instance_id"], applied_macs(second)) == (True, NEW_UUID, [NEW_MAC])


@pytest.mark.integration
def test_import_with_the_same_nics_leaves_the_disk_byte_for_byte(tmp_path: Path,
                                                                 installed: tuple[Path, Path]) -> None:
    etc, os_dir = installed
    src = gi.gpt_root_first(tmp_path / "disk0.img")
    create(etc, [src])
    dst = tmp_path / "imported.img"
    proc = export_then_import(os_dir, src, dst, [dst], 0, instance_uuid=NEW_UUID)
    assert sha256(dst) == sha256(src)
    assert "already matches the instance's NICs and name; left as imported" in proc.stderr


@pytest.mark.integration
def test_a_site_without_reseed_gets_the_export_byte_for_byte(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    etc, os_dir = installed
    src = gi.gpt_root_first(tmp_path / "disk0.img")
    create(etc, [src])
    dst = tmp_path / "imported.img"
    (etc / "defaults.conf").write_text("[Import]\nReseed = no\n")
    try:
        proc = export_then_import(os_dir, src, dst, [dst], 0, macs=[NEW_MAC], instance_uuid=NEW_UUID)
    finally:
        (etc / "defaults.conf").unlink()
    assert sha256(dst) == sha256(src)
    assert "left as imported ([Import] Reseed = no)" in proc.stderr


@pytest.mark.integration
def test_import_keeping_the_instance_id_warns(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    etc, os_dir = installed
    src = gi.gpt_root_first(tmp_path / "disk0.img")
    create(etc, [src])
    dst = tmp_path / "imported.img"
    proc = export_then_import(os_dir, src, dst, [dst], 0, macs=[NEW_MAC], instance_uuid=NEW_UUID,
                              params={"keep_instance_id": "yes"})
    after = dh.read_nocloud_in_guest(dst)
    assert after["instance_id"] == OLD_UUID
    assert [i["mac_address"] for i in after["network"]["interfaces"]] == [NEW_MAC]
    assert "keep_instance_id is set, so the guest applies the new network configuration only if" in proc.stderr
    # Why the warning: a guest that had booted keeps its cached datasource and applies nothing.
    guest = tmp_path / "guest-var-lib-cloud"
    assert boot("nocloud", nocloud_dir_of(src, tmp_path / "seed-before"), guest)["new_instance"]
    second = boot("nocloud", nocloud_dir_of(dst, tmp_path / "seed-after"), guest)
    assert (second["restored_from_cache"], second["new_instance"], second["applied"]) == (True, False, None)


@pytest.mark.integration
@pytest.mark.parametrize(("seed_kind", "reader"), [("nocloud-disk", "nocloud"), ("configdrive-disk", "configdrive")])
def test_import_of_a_seed_disk(tmp_path: Path, installed: tuple[Path, Path], seed_kind: str, reader: str) -> None:
    etc, os_dir = installed
    disk0 = gi.gpt_root_first(tmp_path / "disk0.img")
    drive = gi.blank(tmp_path / "disk1.img", 16)
    create(etc, [disk0, drive], seed=seed_kind)
    before = dh.read_fat_seed(drive, reader)
    guest = tmp_path / "guest-var-lib-cloud"
    assert applied_macs(boot(reader, dh.extract_fat(drive, tmp_path / "seed-before"), guest)) == list(OLD_MACS)
    new_drive = tmp_path / "imported1.img"
    # Ganeti imports disk 1 in its own run, at the same time as disk 0: only disk 1 is looked at.
    export_then_import(os_dir, drive, new_drive, [disk0, new_drive], 1, macs=[NEW_MAC, OLD_MACS[1]],
                       instance_uuid=NEW_UUID)
    after = dh.read_fat_seed(new_drive, reader)
    assert [i["mac_address"] for i in before["network"]["interfaces"]] == list(OLD_MACS)
    assert [i["mac_address"] for i in after["network"]["interfaces"]] == [NEW_MAC, OLD_MACS[1]]
    assert (before["instance_id"], after["instance_id"]) == (OLD_UUID, NEW_UUID)
    assert after["userdata_raw"] == before["userdata_raw"]
    second = boot(reader, dh.extract_fat(new_drive, tmp_path / "seed-after"), guest)
    assert (second["new_instance"], applied_macs(second)) == (True, [NEW_MAC, OLD_MACS[1]])


@pytest.mark.integration
def test_import_of_a_flamingo_config_drive_keeps_its_uuid(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    etc, os_dir = installed
    disk0 = gi.gpt_root_first(tmp_path / "disk0.img")
    drive = gi.blank(tmp_path / "disk1.img", 16)
    create(etc, [disk0, drive], variant="flam")
    new_disk0, new_drive = tmp_path / "imported0.img", tmp_path / "imported1.img"
    new_drive.touch()  # Ganeti has created every disk before the first import runs
    new: dict[str, Any] = {"macs": [NEW_MAC], "instance_uuid": NEW_UUID, "variant": "flam", "name": "vm2.example.org"}
    # disk 0: flamingo's host name and keys in the guest do not depend on the NICs; left alone.
    proc0 = export_then_import(os_dir, disk0, new_disk0, [new_disk0, new_drive], 0, **new)
    assert sha256(new_disk0) == sha256(disk0) and "disk 0: no seed on it" in proc0.stderr
    export_then_import(os_dir, drive, new_drive, [new_disk0, new_drive], 1, **new)
    md = json.loads(gi.sh("mcopy", "-n", "-i", os.fspath(new_drive), "::/openstack/2012-08-10/meta_data.json", "-",
                          env={"MTOOLS_SKIP_CHECK": "1"}))
    assert (md["uuid"], md["hostname"]) == (OLD_UUID, "vm2.example.org")
    after = dh.read_fat_seed(new_drive, "configdrive")
    assert [i["mac_address"] for i in after["network"]["interfaces"]] == [NEW_MAC]


@pytest.mark.integration
def test_a_disk_without_our_seed_is_left_alone(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    _etc, os_dir = installed
    src = gi.gpt_root_first(tmp_path / "disk0.img")  # an image from elsewhere: no seed directory
    dst = tmp_path / "imported.img"
    proc = export_then_import(os_dir, src, dst, [dst], 0, macs=[NEW_MAC], instance_uuid=NEW_UUID)
    assert sha256(dst) == sha256(src)
    lines = [ln for ln in proc.stderr.splitlines() if "disk 0: no seed on it" in ln]
    assert len(lines) == 1 and "warning" not in proc.stderr.lower()


@pytest.mark.integration
def test_a_seed_that_cannot_be_updated_is_a_warning_not_a_failed_import(tmp_path: Path,
                                                                         installed: tuple[Path, Path]) -> None:
    etc, os_dir = installed
    drive = gi.blank(tmp_path / "disk1.img", 16)
    disk0 = gi.gpt_root_first(tmp_path / "disk0.img")
    create(etc, [disk0, drive], seed="nocloud-disk")
    gi.sh("mcopy", "-o", "-i", os.fspath(drive), "-", "::/meta-data", input=b"{not: yaml",
          env={"MTOOLS_SKIP_CHECK": "1"})
    new_drive = tmp_path / "imported1.img"
    proc = export_then_import(os_dir, drive, new_drive, [disk0, new_drive], 1, macs=[NEW_MAC], instance_uuid=NEW_UUID)
    (line,) = [ln for ln in proc.stderr.splitlines() if "could not be updated" in ln]
    assert "warning" in line.lower() and "meta-data cannot be read" in line
    assert "gnt-instance modify --net N:modify,mac=MAC" in line
    assert sha256(new_drive) == sha256(drive)


@pytest.mark.integration
def test_import_onto_a_uri_disk_reseeds_before_the_copy_out(tmp_path: Path, installed: tuple[Path, Path]) -> None:
    """A URI-only disk (access=userspace) is imported into a staging file; the re-seed runs on
    that file, so the new seed is what reaches the disk behind the URI."""
    from tests.disk.test_uri import nbd_served

    etc, os_dir = installed
    src = gi.gpt_root_first(tmp_path / "disk0.img")
    create(etc, [src], ssh_authorized_keys=dh.KEY)
    dst = tmp_path / "imported.img"
    with open(dst, "wb") as f:
        f.truncate(src.stat().st_size)
    (etc / "defaults.conf").write_text(f"[Disks]\nStagingDirectory = {tmp_path / 'staging'}\n")
    exp = env_of([src], index=0, export_device=src)
    stream = subprocess.run([os_dir / "export"], env=exp, cwd=os_dir, capture_output=True, check=True).stdout
    try:
        with nbd_served(dst) as uri:
            env = env_of([SimulatedDisk(uri=uri)], macs=[NEW_MAC], instance_uuid=NEW_UUID, index=0,
                         params={"ssh_authorized_keys": dh.KEY})
            proc = subprocess.run([os_dir / "import"], env=env, cwd=os_dir, input=stream, capture_output=True,
                                  check=False)
    finally:
        (etc / "defaults.conf").unlink()
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"warning" not in proc.stderr.lower()
    after = dh.read_nocloud_in_guest(dst)
    assert [(i["name"], i["mac_address"]) for i in after["network"]["interfaces"]] == [("eth0", NEW_MAC)]
    assert after["instance_id"] == NEW_UUID
    assert not any((tmp_path / "staging").iterdir())
