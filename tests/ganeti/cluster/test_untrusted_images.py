"""An instance from an untrusted image (the ``image`` parameter) through its life on the real cluster
(issue 14): gnt-instance add writes a seed partition at the end of disk 0, which reinstall,
export/import with a new MAC and rename update; the imported disk equals the export except for the
seed partition."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from ganeti_cluster import SITE_VARIANT, GanetiCluster

from instance_cloudimage.sources.demo import build_demo_image
from tests.support import delivery_helpers as dh

pytestmark = pytest.mark.ganeti

NAME, NEW_NAME = "untrusted-ci1", "untrusted-ci2"
DISK_SIZE = "256M"  # the demo image is 128 MiB
KEY = dh.KEY
USER_DATA = "#cloud-config\nruncmd:\n  - [touch, /root/untrusted-cluster]\n"


def image_in_allowed_dir(cluster: GanetiCluster) -> Path:
    """The demo image as a local file the image parameter may name (inside AllowedDirectories,
    not inside any TrustedDirectories: untrusted)."""
    image = cluster.image_dir / "untrusted-demo.qcow2"
    if not image.exists():
        shutil.copyfile(build_demo_image("demo", cluster.cache_dir), image)
    return image


def outside(disk: Path, offset: int, size: int) -> str:
    """The digest of every byte of ``disk`` but the seed partition's."""
    h = hashlib.sha256()
    with open(disk, "rb") as f:
        h.update(f.read(offset))
        f.seek(offset + size)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def test_untrusted_image_life(ganeti_cluster: GanetiCluster) -> None:
    cluster = ganeti_cluster
    params = {"image": os.fspath(image_in_allowed_dir(cluster)), "ssh_authorized_keys": KEY}
    cluster.add_instance(NAME, variant=SITE_VARIANT, disk_size=DISK_SIZE, params=params,
                         secret={"user_data": USER_DATA})
    add_log = cluster.read_os_logs("add", NAME)
    assert "image trust: untrusted (named by the image parameter)" in add_log, add_log
    assert "seed delivery: nocloud-partition" in add_log
    disk = cluster.disk_path_of(NAME)
    offset, size, label = dh.seed_partition_of(disk)
    assert label == "CIDATA" and disk.stat().st_size - (offset + size) < 2 * 1024**2
    seed = dh.read_seed_partition(disk, "nocloud")
    uuid, macs = cluster.field_of(NAME, "uuid"), cluster.field_of(NAME, "nic.macs").split(",")
    assert seed["instance_id"] == uuid and seed["fqdn"] == cluster.fqdn(NAME)
    assert seed["public_keys"] == [KEY]
    assert seed["merged"]["runcmd"] == [["touch", "/root/untrusted-cluster"]]
    assert [i["mac_address"] for i in seed["network"]["interfaces"]] == macs

    # Reinstall (Ganeti 3.0 keeps only the parameters given): a new seed partition, a new instance-id.
    cluster.reinstall(NAME, params=params, secret={"user_data": USER_DATA})
    reinstalled = dh.read_seed_partition(disk, "nocloud")
    assert reinstalled["instance_id"] != uuid and reinstalled["fqdn"] == cluster.fqdn(NAME)
    assert dh.seed_partition_of(disk)[:2] == (offset, size)

    # Export, remove, import with a new MAC: the seed partition is rewritten, nothing else changes.
    cluster.export(NAME)
    exported = outside(disk, offset, size)
    cluster.remove_instance(NAME)
    cluster.import_(NAME, NAME, disk_size=DISK_SIZE)
    imported = cluster.disk_path_of(NAME)
    new_uuid, new_macs = cluster.field_of(NAME, "uuid"), cluster.field_of(NAME, "nic.macs").split(",")
    assert new_macs[0] not in macs
    assert dh.seed_partition_of(imported)[:2] == (offset, size)
    assert outside(imported, offset, size) == exported, "the imported disk differs outside the seed partition"
    after = dh.read_seed_partition(imported, "nocloud")
    assert [i["mac_address"] for i in after["network"]["interfaces"]] == new_macs
    assert after["instance_id"] == new_uuid and after["public_keys"] == [KEY]
    assert after["merged"]["runcmd"] == [["touch", "/root/untrusted-cluster"]]
    import_log = cluster.read_os_logs("import", NAME)
    assert f"network configuration now for MAC {new_macs[0]}" in import_log, import_log
    assert "warning" not in import_log.lower()

    # Rename: the new name in the seed partition.
    cluster.rename(NAME, NEW_NAME)
    renamed = dh.read_seed_partition(cluster.disk_path_of(NEW_NAME), "nocloud")
    assert renamed["fqdn"] == cluster.fqdn(NEW_NAME) and renamed["instance_id"] == new_uuid
    rename_log = cluster.read_os_logs("rename", NEW_NAME)
    assert "seed file(s) now carry the name" in rename_log and "warning" not in rename_log.lower()
    cluster.remove_instance(NEW_NAME)

