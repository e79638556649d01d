"""One fully configured instance through its life on the real cluster (issues 5 and 6).

An administrator's instance: SSH keys and DNS as public parameters, a password hash as a private
one, user-data as a secret one; NIC 0 with a pool address on a Ganeti network (IPv4 and IPv6
subnets and gateways), NIC 1 bridged without an address (DHCP), and Ganeti's
instance-communication NIC last; a disk twice the image's size with grow_root=yes; and a site
post-write hook.  The module fixture creates it once and looks at its disk right away (read-only);
the tests then check what cloud-init reads from the seed, the hook's marker and the grown root,
and walk it through reinstall, export, remove, import and rename.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ganeti_cluster import SITE_VARIANT, SITE_VARIANT_USER, GanetiCluster

from instance_cloudimage.seed.network import eui64_address
from tests.support.guest_disk import (
    RootFilesystem,
    digest_outside_root,
    filesystem_manifest,
    inspect_root_filesystem,
    read_dump_header,
    read_guest_file,
    read_seed,
    sha256_of,
)

pytestmark = pytest.mark.ganeti

NAME, NEW_NAME = "life-ci1", "life-ci2"
DISK_SIZE = "256M"  # the demo image is 128 MiB
NETWORK, COMM_NETWORK = "net-life", "gnt-com-life"
SUBNET, GATEWAY = "203.0.113.0/24", "203.0.113.1"
SUBNET6, GATEWAY6 = "2001:db8:c1::/64", "2001:db8:c1::1"
NAMESERVER, SEARCH = "203.0.113.53", "example.test"
ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM2ziK4RM0utYUnNU57yaVLln5aVvIYlUM/oaMR+Tcc1 alice@example"
ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXg0BvBqVzZSmaYdnQd4dOYZDsaSX0WrFsMiDI8/NMg bob@example"
HASH = "$y$j9T$F31F/jItUvvjOv6IBFNea/$SFRtZtCIUWcnypijZA5cTGTLcjo306tI.KLnmc0noD1"
USER_DATA_TOKEN = "ud-7f3a9c"  # only in the secret user-data: must reach the seed and no log
# Commas and newlines inside a value: ganeti_cluster escapes the commas for Ganeti's option parser.
USER_DATA = f"#cloud-config\npackages: [htop, tmux]\nruncmd:\n  - [touch, /root/{USER_DATA_TOKEN}]\n"
PUBLIC = {"ssh_authorized_keys": f"{ED};{ED2}", "dns_nameservers": NAMESERVER, "dns_search": SEARCH,
          "grow_root": "yes"}
PRIVATE = {"password_hash": HASH}
SECRET = {"user_data": USER_DATA}

MARKER = "root/cluster-hook-marker"
HOOK = f"""#!/bin/sh
# A site post-write hook: leave a marker in the guest saying what it saw.
set -eu
{{
  echo "phase=$HOOK_PHASE"
  echo "instance=$INSTANCE_NAME"
  if mountpoint -q "$TARGET"; then echo "target=mounted"; fi
  if [ -f "$TARGET/var/lib/cloud/seed/nocloud/meta-data" ]; then echo "seed=written"; fi
  echo "params=$(env | sed -n 's/^OSP_\\([A-Z_]*\\)=.*/\\1/p' | sort | tr '\\n' ' ')"
}} > "$TARGET/{MARKER}"
"""


@dataclass(frozen=True)
class Created:
    """The instance as Ganeti reports it and its disk as found right after the create."""

    uuid: str
    macs: list[str]
    ips: list[str]
    nic_names: str
    disk: Path
    seed: dict[str, Any]
    marker: str | None
    root_fs: RootFilesystem
    add_log: str
    communication: str | None  # why there is no communication NIC, or None


def enable_communication_network(cluster: GanetiCluster) -> str | None:
    """Ganeti's instance-communication network; None when enabled, else why it is not."""
    result = cluster.gnt("gnt-cluster", "modify", f"--instance-communication-network={COMM_NETWORK}", check=False)
    if result.returncode != 0:
        return f"gnt-cluster modify --instance-communication-network failed: {result.output.strip()[-300:]}"
    return None


def disable_communication_network(cluster: GanetiCluster) -> None:
    cluster.gnt("gnt-cluster", "modify", "--instance-communication-network=", check=False)
    if COMM_NETWORK in cluster.gnt("gnt-network", "list", "--no-headers", "-o", "name").stdout.split():
        cluster.remove_network(COMM_NETWORK)


@pytest.fixture(scope="module")
def created(ganeti_cluster: GanetiCluster) -> Iterator[Created]:
    cluster = ganeti_cluster
    cluster.add_network(NETWORK, SUBNET, gateway=GATEWAY, network6=SUBNET6, gateway6=GATEWAY6)
    no_communication = enable_communication_network(cluster)
    try:
        with cluster.site_hooks("post-write", {"70-cluster-marker": HOOK}):
            cluster.add_instance(NAME, variant=SITE_VARIANT, disk_size=DISK_SIZE, params=PUBLIC, private=PRIVATE,
                                 secret=SECRET, nics=[f"0:network={NETWORK},ip=pool", "1:mode=bridged"],
                                 extra=["-c", "no" if no_communication else "yes"])
        disk = cluster.disk_path_of(NAME)
        marker = read_guest_file(disk, MARKER)
        yield Created(
            uuid=cluster.field_of(NAME, "uuid"),
            macs=cluster.field_of(NAME, "nic.macs").split(","),
            ips=cluster.field_of(NAME, "nic.ips").split(","),
            nic_names=cluster.field_of(NAME, "nic.names"),
            disk=disk,
            seed=read_seed(disk),
            marker=None if marker is None else marker.decode(),
            root_fs=inspect_root_filesystem(disk),
            add_log=cluster.read_os_logs("add", NAME),
            communication=no_communication,
        )
    finally:
        left = cluster.instances()
        for name in (NAME, NEW_NAME):
            if cluster.fqdn(name) in left:
                cluster.remove_instance(name, check=False)
        disable_communication_network(cluster)
        cluster.remove_network(NETWORK)


def networkd(seed: dict[str, Any], nic: int) -> str:
    return str(seed["network"]["files"][f"etc/systemd/network/10-cloud-init-eth{nic}.network"])


# --- the seed, as Debian's cloud-init reads it (issue 5) ----------------------------------------

def test_seed_carries_identity_keys_password_and_user_data(ganeti_cluster: GanetiCluster, created: Created) -> None:
    seed = created.seed
    assert "seed delivery: nocloud-fs (cloud-init agent)" in created.add_log
    assert seed["dsname"] == "NoCloud"
    assert seed["instance_id"] == created.uuid  # Ganeti's INSTANCE_UUID on a first install
    assert (seed["hostname"], seed["fqdn"]) == (NAME, ganeti_cluster.fqdn(NAME))
    assert seed["public_keys"] == [ED, ED2]
    assert seed["authorized_keys"].splitlines() == [ED, ED2]
    # The private password hash, for the variant's default user, never as plain text.
    assert seed["default_user"] == SITE_VARIANT_USER
    (user,) = seed["calls"]["create_user"]
    assert (user["name"], user["hashed_passwd"], user["lock_passwd"]) == (SITE_VARIANT_USER, HASH, False)
    assert seed["calls"]["chpasswd"] == []
    # The secret user-data, merged with ours.
    assert seed["merged"]["packages"] == ["htop", "tmux"]
    # With the communication NIC, our metad refresh unit's enable comes first (test_metad.py).
    ours = [] if created.communication else [["systemctl", "enable", "cloudimage-metad.service"]]
    assert seed["merged"]["runcmd"] == [*ours, ["touch", f"/root/{USER_DATA_TOKEN}"]]
    assert seed["modes"] == {n: (0o600, 0) for n in ("meta-data", "user-data", "network-config")}


def test_no_private_or_secret_value_in_the_os_logs(ganeti_cluster: GanetiCluster, created: Created) -> None:
    assert created.add_log
    for log in ganeti_cluster.os_logs():
        text = log.read_text(errors="replace")
        assert USER_DATA_TOKEN not in text and HASH not in text, f"a private value in {log}"


def test_seed_network_static_address_on_the_ganeti_network_and_dhcp(created: Created) -> None:
    seed = created.seed
    names = [i["name"] for i in seed["network"]["interfaces"]]
    macs = [i["mac_address"] for i in seed["network"]["interfaces"]]
    assert macs == created.macs  # every NIC matched by the MAC Ganeti gave it, in order
    assert names == [f"eth{i}" for i in range(len(created.macs))]

    ip = ipaddress.IPv4Address(created.ips[0])  # Ganeti's pool address on NIC 0
    assert ip in ipaddress.IPv4Network(SUBNET)
    eui = eui64_address(created.macs[0], ipaddress.IPv6Network(SUBNET6))
    v4, v6 = seed["network"]["interfaces"][0]["subnets"]
    assert (v4["type"], v4["address"], v4["prefix"], v4["gateway"]) == ("static", str(ip), 24, GATEWAY)
    assert (v6["type"], v6["address"], v6["prefix"], v6["gateway"]) == ("static", str(eui), 64, GATEWAY6)
    assert seed["network"]["dns_nameservers"] == [NAMESERVER]

    eth0 = networkd(seed, 0)
    for line in (f"MACAddress={created.macs[0]}", f"Address={ip}/24", f"Address={eui}/64", f"Gateway={GATEWAY}",
                 f"Gateway={GATEWAY6}", f"DNS={NAMESERVER}"):
        assert line in eth0, eth0
    # NIC 1 has no address: DHCP, without a second default route.
    eth1 = networkd(seed, 1)
    assert "DHCP=ipv4" in eth1 and "UseRoutes=False" in eth1 and "Gateway" not in eth1
    assert f"MACAddress={created.macs[1]}" in eth1
    # One IPv4 default route, whichever renderer the guest uses.
    eni = seed["network"]["files"]["etc/network/interfaces"]
    assert eni.count(f"gateway {GATEWAY}") == 1 and "iface eth1 inet dhcp" in eni
    sysconfig = seed["network"]["files"]["etc/sysconfig/network-scripts/ifcfg-eth0"]
    assert f"IPADDR={ip}" in sysconfig and f"IPV6_DEFAULTGW={GATEWAY6}" in sysconfig
    assert "GATEWAY" not in seed["network"]["files"]["etc/sysconfig/network-scripts/ifcfg-eth1"]


def test_communication_nic_gets_dhcp_without_a_default_route(created: Created) -> None:
    if created.communication:
        pytest.skip(created.communication)
    assert created.nic_names.endswith(f"'ganeti:communication:{NAME}.example.test']"), created.nic_names
    assert len(created.macs) == 3
    comm = created.seed["network"]["interfaces"][2]
    assert (comm["name"], comm["mac_address"]) == ("eth2", created.macs[2])
    assert [s["type"] for s in comm["subnets"]] == ["dhcp4"]
    eth2 = networkd(created.seed, 2)
    for line in ("DHCP=ipv4", "UseRoutes=False", "UseDNS=False"):
        assert line in eth2, eth2
    assert "Gateway" not in eth2 and "\nDNS=" not in eth2
    assert created.seed["network_config"]["ethernets"]["eth2"]["optional"] is True


# --- hooks and root growth (issue 6) ------------------------------------------------------------

def test_site_post_write_hook_ran_with_the_guest_mounted(ganeti_cluster: GanetiCluster, created: Created) -> None:
    assert created.marker is not None, f"no {MARKER} in the guest; add log:\n{created.add_log}"
    lines = created.marker.splitlines()
    assert lines[:4] == ["phase=post-write", f"instance={ganeti_cluster.fqdn(NAME)}", "target=mounted",
                         "seed=written"]
    params = lines[4].removeprefix("params=").split()
    assert "SSH_AUTHORIZED_KEYS" in params and "GROW_ROOT" in params
    # Secret parameters are withheld from hooks unless the site passes them.
    assert "USER_DATA" not in params and "PASSWORD_HASH" not in params
    assert "running post-write hook" in created.add_log and "70-cluster-marker" in created.add_log


def test_grow_root_fills_the_disk(created: Created) -> None:
    fs = created.root_fs
    disk_size = created.disk.stat().st_size
    assert disk_size == 256 * 1024**2
    assert fs.partition.end >= disk_size - 1024**2  # up to the backup GPT at the disk's end
    assert fs.partition.size > 250 * 1024**2
    assert fs.partition.size - fs.size < 64 * 1024  # the filesystem fills its partition
    assert fs.fsck_clean, fs.fsck_output


# --- reinstall, export, remove, import, rename --------------------------------------------------

def test_reinstall_writes_a_seed_with_a_new_instance_id(ganeti_cluster: GanetiCluster, created: Created) -> None:
    cluster = ganeti_cluster
    cluster.reinstall(NAME, params=PUBLIC, private=PRIVATE, secret=SECRET)  # secrets are given again
    seed = read_seed(cluster.disk_path_of(NAME))
    assert seed["instance_id"] != created.uuid and uuid.UUID(seed["instance_id"])
    assert seed["fqdn"] == cluster.fqdn(NAME) and seed["public_keys"] == [ED, ED2]
    # With the communication NIC, our metad refresh unit's enable comes first (test_metad.py).
    ours = [] if created.communication else [["systemctl", "enable", "cloudimage-metad.service"]]
    assert seed["merged"]["runcmd"] == [*ours, ["touch", f"/root/{USER_DATA_TOKEN}"]]
    assert seed["network_config"] == created.seed["network_config"]


def test_export_remove_import_rename(ganeti_cluster: GanetiCluster, created: Created) -> None:
    """add → export → remove → import (new MAC, onto a block device) → rename.

    The import writes the exported disk byte for byte and then re-seeds it for the new NIC, which
    rewrites the seed's network-config and meta-data (and so blocks of the root filesystem).  The
    data is therefore compared with the seed left out: every byte outside the root partition, and
    every file, directory and link of the root filesystem (content, mode, owner, mtime) but the
    seed directory, which must be clean for fsck.  A re-seed that changes nothing keeps the whole
    disk identical (tests/test_reseed.py checks that byte for byte), and so does a site with
    ``[Import] Reseed = no``: the same export is first imported that way and compared whole.
    """
    cluster = ganeti_cluster
    cluster.export(NAME)
    disk = cluster.disk_path_of(NAME)
    size = disk.stat().st_size
    exported_sha256 = sha256_of(disk)  # first: the inspections below mount the guest
    outside, manifest = digest_outside_root(disk), filesystem_manifest(disk)
    exported = read_seed(disk)
    cluster.remove_instance(NAME)
    assert cluster.fqdn(NAME) not in cluster.instances()

    (dump,) = cluster.export_dumps(NAME)
    assert read_dump_header(dump).disk_size == size  # our compact stream, not a raw copy
    assert dump.stat().st_size < size // 8, f"{dump.stat().st_size} bytes for a sparse {size}-byte disk"

    # [Import] Reseed = no: imported under the same name (a new name makes Ganeti run rename, which
    # updates the seed's host name) and with a new MAC, the disk is the exported one byte for byte;
    # its seed then still names the old NICs, as docs/lifecycle.md says.
    site = cluster.config_dir / "defaults.conf"
    before = site.read_text()
    site.write_text(before + "[Import]\nReseed = no\n")
    try:
        cluster.import_(NAME, NAME, template="ext", disk_size=DISK_SIZE)
    finally:
        site.write_text(before)
    exact_log = cluster.read_os_logs("import", NAME)
    assert "left as imported ([Import] Reseed = no)" in exact_log, exact_log
    assert sha256_of(cluster.disk_path_of(NAME)) == exported_sha256
    cluster.remove_instance(NAME)

    # --net 0:mac=generate: Ganeti takes only the NICs given (one, default settings, a new MAC) and
    # gives the instance a new UUID.
    cluster.import_(NAME, NAME, template="ext", disk_size=DISK_SIZE)
    imported = cluster.disk_path_of(NAME)
    new_uuid, new_macs = cluster.field_of(NAME, "uuid"), cluster.field_of(NAME, "nic.macs").split(",")
    assert len(new_macs) == 1 and new_macs[0] not in created.macs
    assert imported.stat().st_size == size
    assert digest_outside_root(imported) == outside, "the imported disk differs outside its root filesystem"
    assert filesystem_manifest(imported) == manifest, "the imported root filesystem differs outside the seed"
    assert inspect_root_filesystem(imported).fsck_clean
    for kind in ("export", "import"):
        text = cluster.read_os_logs(kind, NAME)
        assert text and "error" not in text.lower() and "warning" not in text.lower(), f"{kind} log: {text}"

    # The seed on the imported disk names the new MAC, with create's rendering for the new NIC set,
    # and a new instance-id so that cloud-init applies it; keys and the secret user-data are kept.
    seed = read_seed(imported)
    assert [(i["name"], i["mac_address"]) for i in seed["network"]["interfaces"]] == [("eth0", new_macs[0])]
    assert f"MACAddress={new_macs[0]}" in networkd(seed, 0) and "DHCP=ipv4" in networkd(seed, 0)
    assert seed["instance_id"] == new_uuid != exported["instance_id"]
    assert seed["seed_files"]["user-data"] == exported["seed_files"]["user-data"]
    # With the communication NIC, our metad refresh unit's enable comes first (test_metad.py).
    ours = [] if created.communication else [["systemctl", "enable", "cloudimage-metad.service"]]
    assert seed["merged"]["runcmd"] == [*ours, ["touch", f"/root/{USER_DATA_TOKEN}"]]
    assert seed["public_keys"] == [ED, ED2] and seed["fqdn"] == cluster.fqdn(NAME)
    assert seed["modes"] == exported["modes"]
    import_log = cluster.read_os_logs("import", NAME)
    assert f"network configuration now for MAC {new_macs[0]}" in import_log, import_log
    assert "cloud-init runs its per-instance modules again" in import_log
    # Ganeti ran rename with the exported instance's name, the same one: the disk was not looked at.
    rename_log = cluster.read_os_logs("rename", NAME)
    assert f"the name {cluster.fqdn(NAME)} did not change; no disk was looked at or written" in rename_log, \
        rename_log

    cluster.rename(NAME, NEW_NAME)
    seed = read_seed(cluster.disk_path_of(NEW_NAME))
    assert (seed["hostname"], seed["fqdn"]) == (NEW_NAME, cluster.fqdn(NEW_NAME))
    assert seed["instance_id"] == new_uuid  # a rename is not a new instance
    assert seed["public_keys"] == [ED, ED2]
    rename_log = cluster.read_os_logs("rename", NEW_NAME)
    assert "seed file(s) now carry the name" in rename_log and "warning" not in rename_log.lower()

