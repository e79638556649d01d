"""A disk Ganeti gives the OS scripts only as a URI (access=userspace), on the real cluster.

cluster.sh's 'nbdfile' ExtStorage provider serves each volume with qemu-nbd on a unix socket and
has no kernel block device, so Ganeti passes DISK_0_URI=nbd+unix:///disk?socket=... and no
DISK_0_PATH, exactly as for rbd or gluster disks.  Ganeti allows access=userspace only with the
kvm hypervisor: the module enables kvm (with cluster.sh's stand-in as kvm_path; no instance is
ever started) for its own instances and disables it again afterwards.

The instance goes add (create writes through the URI) → export → remove → import (under a new
name, with a new MAC, so Ganeti also runs rename on the URI-only disk); the imported disk must
equal the exported one except for the seed, which the import rewrites for the new NIC.  Between
steps the disks are deactivated, which stops the volume's qemu-nbd, and the volume's file is read
directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ganeti_cluster import KVM_STUB, NBD_RUN_DIR, GanetiCluster

from tests.support.guest_disk import (
    RootFilesystem,
    digest_outside_root,
    filesystem_manifest,
    inspect_root_filesystem,
    read_dump_header,
    read_seed,
    sha256_of,
)

pytestmark = pytest.mark.ganeti

NAME, IMPORTED = "uri-ci1", "uri-ci2"
DISK_SIZE = "256M"  # the demo image is 128 MiB
DISK_BYTES = 256 * 1024**2
DISK = f"0:size={DISK_SIZE},provider=nbdfile,access=userspace"
ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM2ziK4RM0utYUnNU57yaVLln5aVvIYlUM/oaMR+Tcc1 alice@example"
URI_RE = re.compile(r"^nbd\+unix:///disk\?socket=" + re.escape(os.fspath(NBD_RUN_DIR)) + r"/[^/]+\.sock$")

# A site post hook (nothing mounted, the disk as Ganeti gave it): what it saw of disk 0.
HOOK = """#!/bin/sh
set -eu
{{
  echo "path=${{DISK_0_PATH-unset}}"
  echo "uri=${{DISK_0_URI-unset}}"
  echo "blockdev=${{BLOCKDEV-unset}}"
}} > {out}
"""


def enabled_hypervisors(cluster: GanetiCluster) -> str:
    m = re.search(r"^\s*enabled hypervisors:\s*(\S+)\s*$", cluster.gnt("gnt-cluster", "info").stdout,
                  re.MULTILINE | re.IGNORECASE)
    assert m, "gnt-cluster info shows no enabled hypervisors"
    return m.group(1)


@pytest.fixture(scope="module")
def kvm(ganeti_cluster: GanetiCluster) -> Iterator[None]:
    """kvm enabled next to the cluster's hypervisors (which stay the default), for this module."""
    cluster = ganeti_cluster
    before = enabled_hypervisors(cluster)
    assert "kvm" not in before.split(","), before
    cluster.gnt("gnt-cluster", "modify", f"--enabled-hypervisors={before},kvm",
                "-H", f"kvm:kvm_path={KVM_STUB},kernel_path=")
    try:
        yield
    finally:
        left = cluster.instances()
        for name in (NAME, IMPORTED):
            if cluster.fqdn(name) in left:
                cluster.remove_instance(name, check=False)
        cluster.gnt("gnt-cluster", "modify", f"--enabled-hypervisors={before}")


def volume_server_running(volume: Path) -> bool:
    """Whether the nbdfile provider's qemu-nbd for ``volume`` (its file) is running."""
    return (NBD_RUN_DIR / volume.name.replace(".img", ".pid")).exists()


def deactivate_disks(cluster: GanetiCluster, name: str) -> Path:
    """Deactivate ``name``'s disks (the provider's detach stops qemu-nbd); returns disk 0's file."""
    volume = cluster.disk_path_of(name)
    cluster.gnt("gnt-instance", "deactivate-disks", cluster.fqdn(name))
    assert not volume_server_running(volume), f"qemu-nbd still serves {volume} after deactivate-disks"
    return volume


def staging_files(cluster: GanetiCluster) -> list[Path]:
    staging = cluster.cache_dir / "staging"
    return sorted(staging.iterdir()) if staging.is_dir() else []


@dataclass(frozen=True)
class Created:
    hook: dict[str, str]  # what the post hook saw of disk 0
    volume: Path
    seed: dict[str, Any]
    root_fs: RootFilesystem
    add_log: str


@pytest.fixture(scope="module")
def created(ganeti_cluster: GanetiCluster, kvm: None) -> Created:
    cluster = ganeti_cluster
    seen = cluster.work_dir / "uri-post-hook.txt"
    with cluster.site_hooks("post", {"70-uri-disk": HOOK.format(out=seen)}):
        cluster.add_instance(NAME, template="ext", disks=[DISK], params={"ssh_authorized_keys": ED},
                             extra=["-H", "kvm"])
    hook = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    volume = deactivate_disks(cluster, NAME)
    return Created(hook=hook, volume=volume, seed=read_seed(volume), root_fs=inspect_root_filesystem(volume),
                   add_log=cluster.read_os_logs("add", NAME))


def test_ganeti_gives_the_disk_only_as_a_uri(created: Created) -> None:
    assert created.hook["path"] == "unset", created.hook
    assert URI_RE.match(created.hook["uri"]), created.hook
    assert created.hook["blockdev"] == "", created.hook  # post hooks see the disk as Ganeti gave it
    assert "is staged in" in created.add_log and created.hook["uri"] in created.add_log


def test_create_wrote_the_image_and_seed_through_the_uri(ganeti_cluster: GanetiCluster, created: Created) -> None:
    assert created.volume.stat().st_size == DISK_BYTES
    seed = created.seed
    assert (seed["hostname"], seed["fqdn"]) == (NAME, ganeti_cluster.fqdn(NAME))
    assert seed["public_keys"] == [ED]
    assert created.root_fs.fsck_clean, created.root_fs.fsck_output
    # The image and the seed, not the whole disk: holes stayed holes on the way through NBD.
    assert created.volume.stat().st_blocks * 512 < DISK_BYTES // 2
    assert staging_files(ganeti_cluster) == []
    assert "warning" not in created.add_log.lower() and "error" not in created.add_log.lower(), created.add_log


def test_export_remove_import_keeps_the_data_and_reseeds(ganeti_cluster: GanetiCluster, created: Created) -> None:
    """export (EXPORT_DISK_URI) → remove → import (IMPORT_DISK_URI) under a new name."""
    cluster = ganeti_cluster
    digest = sha256_of(created.volume)
    outside, manifest = digest_outside_root(created.volume), filesystem_manifest(created.volume)
    cluster.export(NAME)
    assert not volume_server_running(created.volume)  # export deactivates the disks it activated
    assert sha256_of(created.volume) == digest, "the export changed the disk"
    (dump,) = cluster.export_dumps(NAME)
    assert read_dump_header(dump).disk_size == DISK_BYTES  # our compact stream, read from the URI
    assert dump.stat().st_size < DISK_BYTES // 8, f"{dump.stat().st_size} bytes for a sparse disk"

    cluster.remove_instance(NAME)
    assert not created.volume.exists()

    # The hypervisor (kvm) comes from the export; the disk is again URI-only.
    cluster.gnt("gnt-backup", "import", "-t", "ext", "--disk", DISK, "--net", "0:mac=generate",
                "-n", cluster.node, "--no-name-check", "--no-ip-check", "--src-node", cluster.node,
                "--src-dir", os.fspath(cluster.export_dir(NAME)), cluster.fqdn(IMPORTED))
    assert cluster.field_of(IMPORTED, "hypervisor") == "kvm"
    imported = deactivate_disks(cluster, IMPORTED)
    assert imported.stat().st_size == DISK_BYTES
    # The data arrives byte for byte; then the re-seed (run on the staging file, before it is
    # copied onto the URI) rewrites the seed for the new MAC, as test_instance_life explains.
    assert digest_outside_root(imported) == outside, "the imported disk differs outside its root filesystem"
    assert filesystem_manifest(imported) == manifest, "the imported root filesystem differs outside the seed"
    assert inspect_root_filesystem(imported).fsck_clean
    seed = read_seed(imported)
    new_mac = cluster.field_of(IMPORTED, "nic.macs")
    assert [i["mac_address"] for i in seed["network"]["interfaces"]] == [new_mac]
    assert seed["instance_id"] == cluster.field_of(IMPORTED, "uuid") != created.seed["instance_id"]
    assert seed["public_keys"] == [ED]
    assert staging_files(cluster) == []

    for kind, name in (("export", NAME), ("import", IMPORTED)):
        text = cluster.read_os_logs(kind, name)
        assert "is staged in" in text, f"{kind} log: {text}"
        assert "error" not in text.lower() and "warning" not in text.lower(), f"{kind} log: {text}"
    # Ganeti ran rename for the new name: a URI-only disk is left alone, and that is no failure.
    rename_log = cluster.read_os_logs("rename", IMPORTED)
    assert f"disk 0 is reachable only through a URI; its seed keeps the old name {cluster.fqdn(NAME)}" in rename_log
    assert "warning" not in rename_log.lower(), rename_log
