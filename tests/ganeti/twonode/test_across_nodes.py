"""Across the nodes of a real two-node cluster: the OS definition distributed with Ganeti's tools
and compared by gnt-cluster verify, an instance created on node2, exported to node1, imported
there with a new MAC and renamed, and an import that fails while Ganeti reports success."""

from __future__ import annotations

import os
import re

from twonode_cluster import CONFIG_DIR, OS_DIR, Installed, TwoNodes, fqdn

from tests.support.guest_disk import digest_outside_root, filesystem_manifest, read_dump_header, read_seed

MIB = 1024 * 1024
NOT_IMPORTED = "were not imported successfully"


def problems(result_text: str) -> list[str]:
    """The ERROR and WARNING lines of gnt-cluster verify (this kernel's procfs warning aside)."""
    return [line for line in result_text.splitlines()
            if re.search(r" - (ERROR|WARNING):", line) and "procfs filesystem" not in line]


def test_the_os_definition_reaches_every_node_and_verify_compares_it(installed: Installed,
                                                                     two_nodes: TwoNodes) -> None:
    # Installed on the master only: verify names the OS missing on the other node (which node is
    # the reference, and so the wording, varies: "Extra OS ... not present on reference node" or
    # "OSes present on reference node ... but missing on this node").
    assert any("cloudimage" in line and ("not present on reference node" in line or "missing on this node" in line)
               for line in problems(installed.on_master_only.output)), installed.on_master_only.output
    # The OS directory copied, but not the site configuration its variants.list points into.
    assert any("OS variants list for cloudimage differs" in line
               for line in problems(installed.without_config.output)), installed.without_config.output
    # Both copied, as docs/install.md says: nothing left to report.
    assert installed.everywhere.returncode == 0, installed.everywhere.describe()
    assert problems(installed.everywhere.output) == [], installed.everywhere.output

    diagnose = installed.diagnose.output
    assert "OS: cloudimage [global status: valid]" in diagnose, diagnose
    node_lines = [line for line in diagnose.splitlines() if "status: valid (path: /srv/ganeti/os/cloudimage)" in line]
    assert len(node_lines) == 2, diagnose
    variants = {re.sub(r"^.*\[variants: ([^]]*)\].*$", r"\1", line) for line in node_lines}
    assert len(variants) == 1 and "demo" in variants.pop().split(", "), diagnose

    # node2 has its own copy (its /srv/ganeti is its own), the same bytes as the master's.
    for name in ("create", "import", "export", "rename", "verify", "ganeti_api_version", "parameters.list"):
        mine, theirs = (two_nodes.host_path(n, f"{OS_DIR}/{name}") for n in ("node1", "node2"))
        assert theirs.read_bytes() == mine.read_bytes(), name
    link = two_nodes.host_path("node2", f"{OS_DIR}/variants.list")
    assert link.is_symlink() and str(link.readlink()) == f"{CONFIG_DIR}/variants.list"


def test_create_on_node2_export_to_node1_import_and_rename(installed: Installed, two_nodes: TwoNodes) -> None:
    nodes = two_nodes
    nodes.add_instance("inst1", "node2", "demo")
    assert nodes.field_of("inst1", "pnode") == fqdn("node2")
    disk = nodes.disk_of("inst1", "node2")
    created = read_seed(disk)  # through Debian's cloud-init
    uuid, mac = nodes.field_of("inst1", "uuid"), nodes.field_of("inst1", "nic.macs")
    assert (created["fqdn"], created["instance_id"]) == (fqdn("inst1"), uuid)
    assert [i["mac_address"] for i in created["network"]["interfaces"]] == [mac]
    assert "installed" in nodes.os_log("node2", "add", "inst1")
    outside, manifest = digest_outside_root(disk), filesystem_manifest(disk)

    # Exported while running (the fake hypervisor's): a file disk cannot be snapshotted, so
    # Ganeti needs --long-sleep to stop the instance for the copy (docs/lifecycle.md).
    nodes.gnt("gnt-instance", "startup", fqdn("inst1"))
    refused = nodes.gnt("gnt-backup", "export", "-n", fqdn("node1"), fqdn("inst1"), check=False)
    assert refused.returncode != 0, refused.output
    nodes.gnt("gnt-instance", "startup", fqdn("inst1"), check=False)  # what the refusal left down
    dump = nodes.export("inst1", to="node1", extra=("--long-sleep",))
    assert nodes.field_of("inst1", "status") == "running"
    assert read_dump_header(dump).disk_size == disk.stat().st_size  # our stream crossed the nodes
    nodes.remove_instance("inst1")

    imported = nodes.import_("inst1", "node1", exported_on="node1")
    assert NOT_IMPORTED not in imported.output, imported.output
    assert nodes.field_of("inst1", "pnode") == fqdn("node1")
    disk = nodes.disk_of("inst1", "node1")
    new_uuid, new_mac = nodes.field_of("inst1", "uuid"), nodes.field_of("inst1", "nic.macs")
    assert new_mac != mac and new_uuid != uuid
    # The export, byte for byte, outside the seed; the seed for the new NIC and a new instance.
    assert digest_outside_root(disk) == outside
    assert filesystem_manifest(disk) == manifest
    seed = read_seed(disk)
    assert [i["mac_address"] for i in seed["network"]["interfaces"]] == [new_mac]
    assert (seed["fqdn"], seed["instance_id"]) == (fqdn("inst1"), new_uuid)
    assert f"network configuration now for MAC {new_mac}" in nodes.os_log("node1", "import", "inst1")
    # Ganeti ran rename after the import, with the same name: nothing was touched.
    assert "did not change; no disk was looked at or written" in nodes.os_log("node1", "rename", "inst1")

    nodes.gnt("gnt-instance", "rename", "-f", "--no-ip-check", "--no-name-check", fqdn("inst1"), fqdn("inst2"))
    seed = read_seed(nodes.disk_of("inst2", "node1"))
    assert (seed["hostname"], seed["fqdn"], seed["instance_id"]) == ("inst2", fqdn("inst2"), new_uuid)


def test_a_failed_import_is_reported_as_success_and_seen_in_the_data(installed: Installed,
                                                                      two_nodes: TwoNodes) -> None:
    nodes = two_nodes
    nodes.add_instance("inst3", "node1", "demo")
    dump = nodes.export("inst3", to="node1")
    nodes.remove_instance("inst3")
    with open(dump, "r+b") as f:  # the export damaged on node1's disk
        f.truncate(dump.stat().st_size // 2)

    # node1's export into a new instance on node2: the import script on node2 fails...
    imported = nodes.import_("inst3", "node2", exported_on="node1")
    # ...and Ganeti says success: exit 0, the instance exists, the job succeeded, one warning.
    assert imported.returncode == 0
    assert fqdn("inst3") in nodes.instances()
    assert NOT_IMPORTED in imported.output, imported.output
    job_id, status = nodes.gnt("gnt-job", "list", "--no-headers", "-o", "id,status").stdout.splitlines()[-1].split()
    assert status == "success"
    job = nodes.gnt("gnt-job", "info", job_id).output
    assert NOT_IMPORTED in job and "cloudimage import: error: the import stream is truncated" in job, job

    # The data says it: the disk on node2 has no partition table and boots nothing (what a failed
    # import had written is blanked at both ends: tests/verbs/test_transfer.py; a stream cut
    # inside its first record writes nothing), and node2's import log says why.
    with open(nodes.disk_of("inst3", "node2"), "rb") as f:
        assert f.read(MIB) == bytes(MIB)
        f.seek(-MIB, os.SEEK_END)
        assert f.read() == bytes(MIB)
    log = nodes.os_log("node2", "import", "inst3")
    assert "cloudimage import: error: the import stream is truncated" in log, log
