"""Ganeti's real metad feeding the guest's refresh unit (issue 15, section 3).

The cluster gets its instance-communication network and an instance added with ``-c yes``; Ganeti
then starts metad on the node and tells it the instance's OS parameters, keyed by the
communication NIC's IP.  The guest is played from a network namespace holding that IP on one end
of a veth pair whose other end, on the node, holds 169.254.169.254: the unit's script, taken from
the seed written onto the instance's disk, runs there (with the system's python3) against a
scratch root prepared as cloud-init's first boot leaves it.  After ``gnt-instance modify -O`` it
applies the new key and host name; from an IP metad does not know it gets a 404 and changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ganeti_cluster import SITE_VARIANT, SITE_VARIANT_USER, GanetiCluster

from instance_cloudimage.seed.metad import CONFIG_PATH, SCRIPT_PATH
from tests.support.guest_disk import read_seed

pytestmark = pytest.mark.ganeti

NAME = "metad-ci1"
COMM_NETWORK = "gnt-com-metad"
NETNS, HOST_END, GUEST_END = "cimetad", "cimetad-h", "cimetad-g"
METAD_IP = "169.254.169.254"
UNKNOWN_IP = "169.254.250.250"
ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM2ziK4RM0utYUnNU57yaVLln5aVvIYlUM/oaMR+Tcc1 alice@example"
ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXg0BvBqVzZSmaYdnQd4dOYZDsaSX0WrFsMiDI8/NMg bob@example"
USER = SITE_VARIANT_USER


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture()
def instance(ganeti_cluster: GanetiCluster) -> Iterator[dict[str, Any]]:
    cluster = ganeti_cluster
    cluster.gnt("gnt-cluster", "modify", f"--instance-communication-network={COMM_NETWORK}")
    try:
        cluster.add_instance(NAME, variant=SITE_VARIANT, params={"ssh_authorized_keys": ED}, extra=["-c", "yes"])
        names = cluster.field_of(NAME, "nic.names")
        comm_ip = cluster.field_of(NAME, "nic.ips").split(",")[-1].strip()
        assert "ganeti:communication:" in names and comm_ip.startswith("169.254."), (names, comm_ip)
        yield {"disk": cluster.disk_path_of(NAME), "ip": comm_ip}
    finally:
        cluster.remove_instance(NAME, check=False)
        cluster.gnt("gnt-cluster", "modify", "--instance-communication-network=", check=False)
        if COMM_NETWORK in cluster.gnt("gnt-network", "list", "--no-headers", "-o", "name").stdout.split():
            cluster.remove_network(COMM_NETWORK)


@pytest.fixture()
def guest_netns(instance: dict[str, Any]) -> Iterator[str]:
    """A network namespace holding the communication NIC's IP, linked to 169.254.169.254 on the node."""
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)  # a killed run's
    ip("netns", "add", NETNS)
    try:
        ip("link", "add", HOST_END, "type", "veth", "peer", "name", GUEST_END, "netns", NETNS)
        ip("addr", "add", f"{METAD_IP}/32", "dev", HOST_END)
        ip("link", "set", HOST_END, "up")
        ip("route", "add", f"{instance['ip']}/32", "dev", HOST_END)
        ip("-n", NETNS, "link", "set", "lo", "up")
        ip("-n", NETNS, "addr", "add", f"{instance['ip']}/16", "dev", GUEST_END)
        ip("-n", NETNS, "link", "set", GUEST_END, "up")
        yield NETNS
    finally:
        subprocess.run(["ip", "link", "del", HOST_END], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)


def prepare_root(root: Path, seed: dict[str, Any]) -> Path:
    """What cloud-init's first boot leaves: the seed's write_files, the default user with the seed's
    keys, the host name.  Returns the script."""
    for f in seed["merged"]["write_files"]:
        p = root / f["path"].lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f["content"])
        p.chmod(int(f["permissions"], 8))
    (root / "etc/passwd").write_text(f"root:x:0:0::/root:/bin/sh\n{USER}:x:1000:1000::/home/{USER}:/bin/sh\n")
    ssh = root / f"home/{USER}/.ssh"
    ssh.mkdir(parents=True)
    (ssh / "authorized_keys").write_text(seed["authorized_keys"])
    (root / "etc/hostname").write_text(NAME + "\n")
    (root / "etc/hosts").write_text(f"127.0.1.1 {NAME}.example.test {NAME}\n")
    return root / SCRIPT_PATH.lstrip("/")


def run_in_guest(netns: str, script: Path, root: Path) -> str:
    proc = subprocess.run(["ip", "netns", "exec", netns, "/usr/bin/python3", os.fspath(script), "--root",
                           os.fspath(root), "--attempts", "5"], capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_the_unit_applies_metads_parameters_after_a_modify(ganeti_cluster: GanetiCluster, instance: dict[str, Any],
                                                           guest_netns: str, tmp_path: Path) -> None:
    seed = read_seed(instance["disk"])
    assert {f["path"] for f in seed["merged"]["write_files"]} >= {SCRIPT_PATH, CONFIG_PATH}
    assert ["systemctl", "enable", "cloudimage-metad.service"] in seed["merged"]["runcmd"]
    root = tmp_path / "guest"
    script = prepare_root(root, seed)
    keys = root / f"home/{USER}/.ssh/authorized_keys"
    assert keys.read_text() == ED + "\n"

    # metad serves what the seed set: nothing to apply.
    before = snapshot(root)
    deadline = time.monotonic() + 60
    while "cannot be reached" in (log := run_in_guest(guest_netns, script, root)) and time.monotonic() < deadline:
        time.sleep(2)  # metad starts on demand; give it a moment
    assert log == "", log
    assert snapshot(root) == before

    ganeti_cluster.gnt("gnt-instance", "modify", "-O", f"ssh_authorized_keys={ED2},hostname=web.example.test",
                       ganeti_cluster.fqdn(NAME))
    log = run_in_guest(guest_netns, script, root)
    assert f"applied 1 SSH key(s) from metad for {USER}" in log and "applied the host name from metad" in log
    assert keys.read_text() == ED2 + "\n"
    assert (root / "etc/hostname").read_text() == "web\n"
    assert (root / "etc/hosts").read_text() == "127.0.1.1 web.example.test web\n"
    assert run_in_guest(guest_netns, script, root) == ""  # the next boot: already applied

    # A guest metad does not know (as after a metad restart or a failover): logged, nothing changes.
    ip("-n", guest_netns, "addr", "flush", "dev", GUEST_END)
    ip("-n", guest_netns, "addr", "add", f"{UNKNOWN_IP}/16", "dev", GUEST_END)
    ip("route", "add", f"{UNKNOWN_IP}/32", "dev", HOST_END)
    applied = snapshot(root)
    assert "metad does not know this instance (404" in run_in_guest(guest_netns, script, root)
    assert snapshot(root) == applied
