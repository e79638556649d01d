"""The simulated Ganeti environment (simulate.py): what the parser reads back from it, and how it
compares with what a live Ganeti 3.0.2 cluster passed (Appendix A, as in test_env.create_env)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.ganeti.env import Script, parse_environment
from instance_cloudimage.ganeti.simulate import (
    SimulatedDisk,
    SimulatedTransfer,
    simulated_core_environment,
    simulated_environment,
)
from instance_cloudimage.runtime.errors import EnvironmentError_
from tests.ganeti.test_env import create_env as live_create_env

CORE = {"PATH", "OS_API_VERSION", "OS_NAME", "OS_VARIANT", "DEBUG_LEVEL"}


@pytest.fixture
def disks(tmp_path: Path) -> list[Path]:
    out = []
    for i in range(2):
        p = tmp_path / f"disk{i}"
        p.write_bytes(b"")
        out.append(p)
    return out


def test_create_reads_back_the_disks_nics_and_parameters(disks: list[Path]) -> None:
    env = simulated_environment(
        "demo", [disks[0], SimulatedDisk(disks[1], backend_type="block", size_mib=512, access="ro")],
        instance_name="web1.example.org", nics=["aa:00:00:11:22:33", "52:54:00:AA:BB:CC"],
        params={"ssh_authorized_keys": "ssh-ed25519 AAAA k", "grow-root": "yes"})
    genv = parse_environment(env, Script.CREATE)
    assert (genv.api_version, genv.os_name, genv.variant, genv.debug_level) == (20, "cloudimage", "demo", 0)
    assert genv.params == {"ssh_authorized_keys": "ssh-ed25519 AAAA k", "grow_root": "yes"}
    assert genv.old_instance_name is None and genv.transfer is None
    inst = genv.require_instance()
    assert inst.name == "web1.example.org"
    assert inst.uuid == str(uuid.uuid5(uuid.NAMESPACE_DNS, "web1.example.org"))
    assert (inst.os, inst.hypervisor, inst.reinstall) == ("cloudimage+demo", "kvm", False)
    d0, d1 = inst.disks
    assert (d0.index, d0.path, d0.uri, d0.size_mib, d0.access, d0.backend_type) == (
        0, str(disks[0]), None, None, "rw", "file:loop")
    assert (d1.index, d1.path, d1.size_mib, d1.size_bytes, d1.access, d1.backend_type) == (
        1, str(disks[1]), 512, 512 << 20, "ro", "block")
    assert [(n.index, n.mac) for n in inst.nics] == [(0, "aa:00:00:11:22:33"), (1, "52:54:00:aa:bb:cc")]
    assert env["PATH"] == "/sbin:/bin:/usr/sbin:/usr/bin"
    assert "INSTANCE_REINSTALL" not in env  # absent on a first install, as in Ganeti


def test_nic_count_reinstall_debug_uuid_and_os_name(disks: list[Path]) -> None:
    env = simulated_environment("plain", [disks[0]], instance_uuid="68c41cfd-8b97-4cda-8ba0-674afdb4b6bd", nics=3,
                                os_name="other", debug=True, reinstall=True)
    genv = parse_environment(env, Script.CREATE)
    assert (genv.os_name, genv.variant, genv.debug_level, genv.params) == ("other", "plain", 1, {})
    inst = genv.require_instance()
    assert inst.uuid == "68c41cfd-8b97-4cda-8ba0-674afdb4b6bd" and inst.os == "other+plain" and inst.reinstall
    assert [n.mac for n in inst.nics] == ["aa:00:00:00:00:00", "aa:00:00:00:00:01", "aa:00:00:00:00:02"]
    assert parse_environment(simulated_environment("plain", [disks[0]]), Script.CREATE).require_instance().nics == ()


def test_rename_carries_the_old_name(disks: list[Path]) -> None:
    env = simulated_environment("demo", [disks[0]], instance_name="new.example.org", old_name="old.example.org")
    genv = parse_environment(env, Script.RENAME)
    assert genv.old_instance_name == "old.example.org"
    assert genv.require_instance().name == "new.example.org"
    with pytest.raises(EnvironmentError_, match="OLD_INSTANCE_NAME"):
        parse_environment(simulated_environment("demo", [disks[0]]), Script.RENAME)


def test_verify_gets_the_core_set_only() -> None:
    env = simulated_core_environment("demo", params={"image": "https://example.org/x.img", "bar-baz": "1"})
    assert set(env) == CORE | {"OSP_IMAGE", "OSP_BAR_BAZ"}
    genv = parse_environment(env, Script.VERIFY)
    assert (genv.os_name, genv.variant, genv.debug_level) == ("cloudimage", "demo", 0)
    assert genv.params == {"image": "https://example.org/x.img", "bar_baz": "1"}
    assert genv.instance is None
    # The instance set is what the core set is extended by, for every other script.
    full = simulated_environment("demo", [], params={"image": "https://example.org/x.img", "bar-baz": "1"})
    assert {k: full[k] for k in env} == env


def test_export_of_a_disk_and_of_a_snapshot(disks: list[Path], tmp_path: Path) -> None:
    env = simulated_environment("demo", disks, transfer=SimulatedTransfer(Script.EXPORT, 1, size_fd=11))
    t = parse_environment(env, Script.EXPORT).transfer
    assert t is not None and (t.index, t.device, t.uri, t.size_fd) == (1, str(disks[1]), None, 11)
    assert env["EXPORT_DISK_PATH"] == str(disks[1]) and env["LC_ALL"] == "C"
    snapshot = tmp_path / "snap"
    snapshot.write_bytes(b"")
    env = simulated_environment("demo", disks, transfer=SimulatedTransfer(Script.EXPORT, 0, device=snapshot))
    genv = parse_environment(env, Script.EXPORT)
    assert genv.transfer is not None and (genv.transfer.device, genv.transfer.size_fd) == (str(snapshot), None)
    assert genv.require_instance().disks[0].path == str(disks[0])
    assert "EXP_SIZE_FD" not in env


def test_import_onto_the_second_disk(disks: list[Path]) -> None:
    env = simulated_environment("demo", disks, nics=1, transfer=SimulatedTransfer(Script.IMPORT, 1, size_fd=11))
    genv = parse_environment(env, Script.IMPORT)
    assert genv.transfer is not None
    assert (genv.transfer.index, genv.transfer.device, genv.transfer.size_fd) == (1, str(disks[1]), 11)
    assert env["IMPORT_DISK_PATH"] == str(disks[1]) and "EXPORT_INDEX" not in env
    with pytest.raises(EnvironmentError_, match="IMPORT_INDEX"):  # the parser needs the transfer's variables
        parse_environment(simulated_environment("demo", disks), Script.IMPORT)


def test_a_uri_only_disk(disks: list[Path]) -> None:
    uri = "rbd:pool/image:id=admin"
    userspace = SimulatedDisk(uri=uri, backend_type="block", size_mib=64)
    genv = parse_environment(simulated_environment("demo", [disks[0], userspace]), Script.CREATE)
    d1 = genv.require_instance().disks[1]
    assert (d1.path, d1.uri, d1.size_mib, d1.backend_type) == (None, uri, 64, "block")
    env = simulated_environment("demo", [userspace], transfer=SimulatedTransfer(Script.IMPORT))
    assert "DISK_0_PATH" not in env and "IMPORT_DEVICE" not in env and "IMPORT_DISK_PATH" not in env
    genv = parse_environment(env, Script.IMPORT)
    assert genv.transfer is not None and (genv.transfer.device, genv.transfer.uri) == (None, uri)
    assert genv.uris() == [uri, uri]


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError, match="path or a URI"):
        SimulatedDisk()
    with pytest.raises(ValueError, match="only import and export"):
        SimulatedTransfer(Script.CREATE)  # type: ignore[arg-type]


def test_the_same_names_and_values_as_a_live_cluster(disks: list[Path]) -> None:
    """Every variable the builder sets, Ganeti 3.0.2 set too, with the same value for the same
    instance (but the hypervisor: 'fake' on the test cluster).  Each script adds what Appendix A
    saw it add."""
    live = live_create_env(disks[0])

    def ours(**script: Any) -> dict[str, str]:
        return simulated_environment("demo", [SimulatedDisk(disks[0], size_mib=1024)],
                                     instance_name="inst1.example.test", instance_uuid=live["INSTANCE_UUID"],
                                     nics=[live["NIC_0_MAC"]], params={"foo": "bar", "bar-baz": "s1"}, **script)

    create = ours()
    assert set(create) <= set(live)
    assert {k for k in create if create[k] != live[k]} == {"HYPERVISOR"}

    def added(**script: Any) -> set[str]:
        return set(ours(**script)) - set(create)

    assert added(old_name="old.example.test") == {"OLD_INSTANCE_NAME"}
    assert added(reinstall=True) == {"INSTANCE_REINSTALL"}
    assert added(transfer=SimulatedTransfer(Script.EXPORT, size_fd=11)) == {
        "EXPORT_DEVICE", "EXPORT_DISK_PATH", "EXPORT_INDEX", "EXP_SIZE_FD", "LC_ALL"}
    assert added(transfer=SimulatedTransfer(Script.IMPORT, size_fd=11)) == {
        "IMPORT_DEVICE", "IMPORT_DISK_PATH", "IMPORT_INDEX", "EXP_SIZE_FD", "LC_ALL"}
