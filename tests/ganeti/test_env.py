"""Parsing the Ganeti environment (ganeti/env.py) with environments as Ganeti 3.0 really passes them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.env import Script, parse_environment, parse_os_params
from instance_cloudimage.ganeti.simulate import simulated_core_environment
from instance_cloudimage.runtime.errors import EnvironmentError_


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk0"
    p.write_bytes(b"")
    return p


def create_env(disk: Path, **extra: str) -> dict[str, str]:
    # What create received on a live Ganeti 3.0.2 cluster.
    env = {
        "DEBUG_LEVEL": "0",
        "DISK_0_ACCESS": "rw",
        "DISK_0_BACKEND_TYPE": "file:loop",
        "DISK_0_PATH": str(disk),
        "DISK_0_SIZE": "1024",
        "DISK_0_UUID": "e3d9fc49-02e9-4825-937f-aa0f7af7a816",
        "DISK_COUNT": "1",
        "HYPERVISOR": "fake",
        "INSTANCE_BE_maxmem": "128",
        "INSTANCE_HV_migration_mode": "live",
        "INSTANCE_NAME": "inst1.example.test",
        "INSTANCE_OS": "cloudimage+demo",
        "INSTANCE_PRIMARY_NODE": "49c772bd-9eb4-427e-9778-245e717935d4",
        "INSTANCE_SECONDARY_NODES": "",
        "INSTANCE_UUID": "68c41cfd-8b97-4cda-8ba0-674afdb4b6bd",
        "NIC_0_BRIDGE": "gntbr0",
        "NIC_0_LINK": "gntbr0",
        "NIC_0_MAC": "aa:00:00:1f:5b:b3",
        "NIC_0_MODE": "bridged",
        "NIC_0_UUID": "e79eccff-0f0d-4ae1-a5c1-e138c5e1b234",
        "NIC_COUNT": "1",
        "OSP_FOO": "bar",
        "OSP_BAR_BAZ": "s1",
        "OS_API_VERSION": "20",
        "OS_NAME": "cloudimage",
        "OS_VARIANT": "demo",
        "PATH": "/sbin:/bin:/usr/sbin:/usr/bin",
    }
    env.update(extra)
    return env


def test_create_environment_as_ganeti_passes_it(disk: Path) -> None:
    genv = parse_environment(create_env(disk), Script.CREATE)
    assert genv.api_version == 20
    assert genv.os_name == "cloudimage"
    assert genv.variant == "demo"
    assert genv.params == {"foo": "bar", "bar_baz": "s1"}
    inst = genv.require_instance()
    assert inst.name == "inst1.example.test"
    assert inst.secondary_nodes == ()
    assert inst.be == {"maxmem": "128"}
    assert inst.hv == {"migration_mode": "live"}
    assert not inst.reinstall
    (d,) = inst.disks
    assert d.path == str(disk) and d.size_mib == 1024 and d.size_bytes == 1024**3
    assert d.is_file
    (nic,) = inst.nics
    assert nic.mac == "aa:00:00:1f:5b:b3" and nic.ip is None and nic.network is None
    assert not nic.is_communication


def test_nic_on_a_ganeti_network_and_communication_nic(disk: Path) -> None:
    env = create_env(
        disk,
        NIC_COUNT="2",
        NIC_0_IP="198.51.100.55",
        NIC_0_NETWORK_NAME="net1",
        NIC_0_NETWORK_SUBNET="198.51.100.0/24",
        NIC_0_NETWORK_GATEWAY="198.51.100.1",
        NIC_0_NETWORK_SUBNET6="2001:db8::/64",
        NIC_0_NETWORK_GATEWAY6="2001:db8::1",
        NIC_0_NETWORK_TAGS="a b",
        NIC_1_MAC="52:54:00:AA:BB:CC",
        NIC_1_IP="169.254.0.5",
        NIC_1_NAME="ganeti:communication:inst1",
        INSTANCE_REINSTALL="1",
    )
    inst = parse_environment(env, Script.CREATE).require_instance()
    assert inst.reinstall
    n0, n1 = inst.nics
    assert n0.ip == ipaddress.ip_address("198.51.100.55")
    assert n0.network is not None
    assert n0.network.subnet == ipaddress.ip_network("198.51.100.0/24")
    assert n0.network.gateway6 == ipaddress.ip_address("2001:db8::1")
    assert n0.network.tags == ("a", "b")
    assert n1.mac == "52:54:00:aa:bb:cc"
    assert n1.is_communication


def test_verify_gets_only_the_core_set() -> None:
    genv = parse_environment(simulated_core_environment("demo", params={"image": "x"}), Script.VERIFY)
    assert genv.instance is None
    assert genv.params == {"image": "x"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"OS_API_VERSION": "15"}, "OS_API_VERSION 15 is not supported"),
        ({"OS_API_VERSION": "x"}, "$OS_API_VERSION must be an integer"),
        ({"INSTANCE_NAME": ""}, "$INSTANCE_NAME must be set"),
        ({"DISK_COUNT": "2"}, "$DISK_1_PATH or $DISK_1_URI must be set"),
        ({"DISK_0_PATH": "relative/disk"}, "$DISK_0_PATH must be an absolute path"),
        ({"DISK_0_PATH": "/nonexistent/disk"}, "$DISK_0_PATH /nonexistent/disk is not accessible"),
        ({"DISK_0_PATH": "/"}, "is neither a block device nor a regular file"),
        ({"DISK_0_SIZE": "big"}, "$DISK_0_SIZE must be an integer"),
        ({"DISK_0_ACCESS": "wx"}, "$DISK_0_ACCESS must be rw or ro"),
        ({"NIC_0_MAC": "zz:00"}, "$NIC_0_MAC is not a MAC address"),
        ({"NIC_0_IP": "1.2.3"}, "$NIC_0_IP is not an IP address"),
        ({"NIC_0_NETWORK_NAME": "n", "NIC_0_NETWORK_SUBNET": "2001:db8::/64"}, "must be an IPv4 network"),
        ({"OS_NAME": "../evil"}, "$OS_NAME is malformed"),
    ],
)
def test_malformed_variables_are_named(disk: Path, change: dict[str, str], message: str) -> None:
    with pytest.raises(EnvironmentError_) as exc:
        parse_environment(create_env(disk, **change), Script.CREATE)
    assert message in str(exc.value)


def test_rename_needs_the_old_name(disk: Path) -> None:
    with pytest.raises(EnvironmentError_, match="OLD_INSTANCE_NAME"):
        parse_environment(create_env(disk), Script.RENAME)
    genv = parse_environment(create_env(disk, OLD_INSTANCE_NAME="old.example.test"), Script.RENAME)
    assert genv.old_instance_name == "old.example.test"


def test_export_extras(disk: Path) -> None:
    env = create_env(disk, EXPORT_INDEX="0", EXPORT_DEVICE=str(disk), EXP_SIZE_FD="11", LC_ALL="C")
    t = parse_environment(env, Script.EXPORT).transfer
    assert t is not None and t.index == 0 and t.device == str(disk) and t.size_fd == 11
    with pytest.raises(EnvironmentError_, match="EXPORT_INDEX"):
        parse_environment(create_env(disk), Script.EXPORT)


def test_os_parameter_names_follow_ganeti_mangling() -> None:
    assert parse_os_params({"OSP_SSH_AUTHORIZED_KEYS": "k", "OSPX": "no", "OS_NAME": "x"}) == {
        "ssh_authorized_keys": "k"
    }


@pytest.mark.parametrize("verb", [Script.EXPORT, Script.IMPORT])
@pytest.mark.parametrize(("device", "message"), [
    ("relative/disk", "_DEVICE must be an absolute path"),
    ("/nonexistent/disk", "_DEVICE /nonexistent/disk is not accessible"),
    ("/", "_DEVICE / is neither a block device nor a regular file"),
])
def test_transfer_device_is_checked_like_a_disk_path(disk: Path, verb: Script, device: str, message: str) -> None:
    word = verb.name
    env = create_env(disk, **{f"{word}_INDEX": "0", f"{word}_DEVICE": device})
    with pytest.raises(EnvironmentError_) as exc:
        parse_environment(env, verb)
    assert f"${word}{message}" in str(exc.value)
