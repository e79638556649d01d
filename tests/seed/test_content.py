"""seed_input and the NoCloud / config-drive builders, as pure functions (no disks, no cloud-init)."""

from __future__ import annotations

import base64
import ipaddress
import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from instance_cloudimage.ganeti.env import GanetiEnv, Instance, Network, Nic
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.runtime.errors import ParameterError, SeedError
from instance_cloudimage.runtime.siteconfig import Paths
from instance_cloudimage.seed.configdrive import RUN_USER_SCRIPT, build_configdrive
from instance_cloudimage.seed.content import (
    build_nocloud,
    check_variant_parameters,
    derive_instance_id,
    read_instance_id,
    rename_seed_input,
    seed_input,
)
from tests.support import delivery_helpers as dh

UUID = "68c41cfd-8b97-4cda-8ba0-674afdb4b6bd"
HASH = "$y$j9T$F31F/jItUvvjOv6IBFNea/$SFRtZtCIUWcnypijZA5cTGTLcjo306tI.KLnmc0noD1"
ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM2ziK4RM0utYUnNU57yaVLln5aVvIYlUM/oaMR+Tcc1 alice@example"
ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXg0BvBqVzZSmaYdnQd4dOYZDsaSX0WrFsMiDI8/NMg bob@example"
PUB = Network(name="pub", subnet=ipaddress.IPv4Network("192.0.2.0/24"), gateway=ipaddress.IPv4Address("192.0.2.1"))


@pytest.fixture
def variants(tmp_path: Path) -> Callable[[str], Variant]:
    return dh.variant_loader(tmp_path, old_ci_user="centos")


def genv(params: dict[str, str] | None = None, *, name: str = "inst1.example.test", reinstall: bool = False,
         nics: tuple[Nic, ...] | None = None, uuid_: str | None = UUID) -> GanetiEnv:
    if nics is None:
        nics = (Nic(0, "aa:00:00:00:00:01", ip=ipaddress.ip_address("192.0.2.10"), network=PUB),)
    inst = Instance(name=name, uuid=uuid_, os="cloudimage+debian-12", hypervisor="kvm", primary_node=None,
                    secondary_nodes=(), disks=(), nics=nics, reinstall=reinstall)
    return GanetiEnv(api_version=20, os_name="cloudimage", variant="debian-12", debug_level=0,
                     params=params or {}, instance=inst)


def test_hostname_defaults_to_the_instance_name(variants: Callable[[str], Variant]) -> None:
    inp = seed_input(genv(), variants("debian-12"))
    assert (inp.hostname.short, inp.fqdn) == ("inst1", "inst1.example.test")
    inp = seed_input(genv({"hostname": "web"}), variants("debian-12"))
    assert (inp.hostname.short, inp.fqdn) == ("web", None)


def test_an_instance_name_that_is_no_hostname_asks_for_the_parameter(variants: Callable[[str], Variant]) -> None:
    with pytest.raises(SeedError, match="set the hostname OS parameter"):
        seed_input(genv(name="my_instance"), variants("debian-12"))
    assert seed_input(genv({"hostname": "ok"}, name="my_instance"), variants("debian-12")).hostname.short == "ok"


def test_instance_id_is_the_uuid_then_changes_on_every_reinstall() -> None:
    first = Instance("i.example", UUID, None, None, None, (), (), ())
    again = Instance("i.example", UUID, None, None, None, (), (), (), reinstall=True)
    assert derive_instance_id(first) == UUID
    a, b = derive_instance_id(again), derive_instance_id(again)
    assert a != b and UUID not in (a, b)
    assert uuid.UUID(a).version == 5
    assert derive_instance_id(again, nonce="n1") == derive_instance_id(again, nonce="n1") != a
    nouuid = Instance("i.example", None, None, None, None, (), (), ())
    assert derive_instance_id(nouuid) == str(uuid.uuid5(uuid.NAMESPACE_DNS, "i.example"))


def test_rename_keeps_the_instance_id_and_takes_the_new_name(variants: Callable[[str], Variant]) -> None:
    old = build_nocloud(seed_input(genv(reinstall=True), variants("debian-12"))).files["meta-data"]
    new = rename_seed_input(seed_input(genv(name="renamed.example.test"), variants("debian-12")), old)
    md = yaml.safe_load(build_nocloud(new).files["meta-data"])
    assert md["instance-id"] == read_instance_id(old) != UUID
    assert md["local-hostname"] == "renamed.example.test"
    assert read_instance_id(b"{not: [yaml") is None and read_instance_id(b"- a list") is None


def test_nocloud_files(variants: Callable[[str], Variant]) -> None:
    params = {"ssh_authorized_keys": f"{ED};{ED2}", "password_hash": HASH, "dns_nameservers": "192.0.2.53",
              "user_data": "#cloud-config\npackages: [htop]\n"}
    files = build_nocloud(seed_input(genv(params), variants("debian-12"))).files
    assert set(files) == {"meta-data", "user-data", "network-config"}
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": UUID, "local-hostname": "inst1.example.test",
                                                  "public-keys": [ED, ED2]}
    ud = files["user-data"].decode()
    assert ud.startswith("#cloud-config\n")
    assert yaml.safe_load(ud) == {"manage_etc_hosts": "localhost", "packages": ["htop"],
                                  "user": {"name": "debian", "hashed_passwd": HASH, "lock_passwd": False}}
    net = yaml.safe_load(files["network-config"])
    assert net["version"] == 2 and net["ethernets"]["eth0"]["addresses"] == ["192.0.2.10/24"]


def test_network_config_v1_when_the_variant_says_so(variants: Callable[[str], Variant]) -> None:
    files = build_nocloud(seed_input(genv(), variants("old-ci"))).files
    assert yaml.safe_load(files["network-config"])["version"] == 1


def test_network_none_writes_no_network_config(variants: Callable[[str], Variant]) -> None:
    inp = seed_input(genv({"network": "none"}), variants("debian-12"))
    assert "network-config" not in build_nocloud(inp).files
    assert "openstack/latest/network_data.json" not in build_configdrive(inp).files


def test_opaque_user_data_moves_our_config_to_vendor_data(variants: Callable[[str], Variant]) -> None:
    doc = '{"role": "db"}'
    inp = seed_input(genv({"user_data": "base64:" + base64.b64encode(doc.encode()).decode()}), variants("debian-12"))
    files = build_nocloud(inp).files
    assert files["user-data"] == doc.encode()
    assert yaml.safe_load(files["vendor-data"]) == {"manage_etc_hosts": "localhost"}
    drive = build_configdrive(inp).files
    assert drive["openstack/latest/user_data"] == doc.encode()
    vendor = json.loads(drive["openstack/latest/vendor_data.json"])
    assert vendor == {"cloud-init": "#cloud-config\nmanage_etc_hosts: localhost\n"}


def test_password_needs_a_default_user(variants: Callable[[str], Variant]) -> None:
    with pytest.raises(SeedError, match="DefaultUser"):
        seed_input(genv({"password_hash": HASH}), variants("demo"))
    seed_input(genv({"ssh_authorized_keys": ED}), variants("demo"))  # keys alone need no user name


def test_invalid_parameters_are_refused(variants: Callable[[str], Variant]) -> None:
    for params in ({"network": "static"}, {"seed": "floppy"}, {"password_hash": "pw"},
                   {"ssh_authorized_keys": "nope"}, {"dns_search": "a_b"}):
        with pytest.raises(ParameterError):
            seed_input(genv(params), variants("debian-12"))


def test_configdrive_for_cloud_init(variants: Callable[[str], Variant]) -> None:
    files = build_configdrive(seed_input(genv({"ssh_authorized_keys": f"{ED}\n{ED2}"}), variants("debian-12"))).files
    assert set(files) == {f"openstack/{v}/{n}" for v in ("latest", "2012-08-10")
                          for n in ("meta_data.json", "user_data", "network_data.json")}
    for name in ("meta_data.json", "user_data", "network_data.json"):
        assert files[f"openstack/latest/{name}"] == files[f"openstack/2012-08-10/{name}"]
    md = json.loads(files["openstack/latest/meta_data.json"])
    assert md["uuid"] == UUID and md["hostname"] == "inst1.example.test" and md["name"] == "inst1.example.test"
    assert md["public_keys"] == {"key-0": ED, "key-1": ED2}
    assert md["keys"] == [{"name": "key-0", "type": "ssh", "data": ED}, {"name": "key-1", "type": "ssh", "data": ED2}]
    assert all(isinstance(v, str) for v in md["meta"].values())  # flamingo decodes meta as map[string]string
    nd = json.loads(files["openstack/latest/network_data.json"])
    assert nd["networks"][0]["gateway"] == "192.0.2.1"


def test_configdrive_for_flamingo(variants: Callable[[str], Variant]) -> None:
    params = {"ssh_authorized_keys": f"{ED};{ED2}", "password_hash": HASH,
              "user_data": "#cloud-config\nruncmd:\n  - touch /x\n"}
    files = build_configdrive(seed_input(genv(params), variants("flamingo-test"))).files
    md = json.loads(files["openstack/2012-08-10/meta_data.json"])
    assert md["public_keys"] == {"root": f"{ED}\n{ED2}"}
    ud = files["openstack/2012-08-10/user_data"].decode()
    assert ud.startswith("#cloud-config\n")
    assert yaml.safe_load(ud) == {"ssh_authorized_keys": [ED, ED2],
                                  "runcmd": [["usermod", "-p", HASH, "root"], "touch /x"]}
    assert "openstack/latest/vendor_data.json" not in files


def test_flamingo_takes_scripts_as_a_runcmd_entry(variants: Callable[[str], Variant], tmp_path: Path) -> None:
    script = "#!/bin/sh\necho \"ran as $0\" > \"$OUT\"\n"
    files = build_configdrive(seed_input(genv({"user_data": script}), variants("flamingo-test"))).files
    ud = files["openstack/latest/user_data"].decode()
    assert ud.startswith("#cloud-config\n")
    (entry,) = yaml.safe_load(ud)["runcmd"]
    assert entry[:2] == ["sh", "-c"] and entry[3:] == ["sh", script]
    # Run it as flamingo would (argv directly), with the temp dir moved off /root.
    out = tmp_path / "out"
    cmd = [entry[0], entry[1], entry[2].replace("/root/", f"{tmp_path}/"), *entry[3:]]
    subprocess.run(cmd, check=True, env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    assert out.read_text().startswith(f"ran as {tmp_path}/.user-data.")
    assert list(tmp_path.glob(".user-data.*")) == []
    assert RUN_USER_SCRIPT == entry[2]


def test_flamingo_refuses_user_data_it_cannot_read(variants: Callable[[str], Variant]) -> None:
    with pytest.raises(ParameterError, match="flamingo"):
        seed_input(genv({"user_data": "#include\nhttps://example.test/x\n"}), variants("flamingo-test"))


def test_verify_checks_parameters_against_the_variant(variants: Callable[[str], Variant], tmp_path: Path) -> None:
    from instance_cloudimage.verbs.verify import run_verify

    assert check_variant_parameters({"password_hash": HASH}, variants("debian-12")) == []
    (problem,) = check_variant_parameters({"password_hash": HASH}, variants("demo"))
    assert "DefaultUser" in problem and HASH not in problem
    (problem,) = check_variant_parameters({"user_data": "#include\nhttps://example.test/x\n"},
                                          variants("flamingo-test"))
    assert "flamingo" in problem
    paths = Paths(tmp_path / "etc", tmp_path / "cache")
    env = GanetiEnv(api_version=20, os_name="cloudimage", variant="flamingo-test", debug_level=0,
                    params={"user_data": "## template: jinja\n#cloud-config\n"})
    with pytest.raises(ParameterError, match="flamingo"):
        run_verify(env, paths, ["parameters"])
    run_verify(GanetiEnv(20, "cloudimage", "flamingo-test", 0, {"user_data": "#!/bin/sh\n"}), paths, ["parameters"])


def test_verify_and_create_refuse_search_domains_without_a_server(variants: Callable[[str], Variant],
                                                                   tmp_path: Path) -> None:
    from instance_cloudimage.verbs.verify import run_verify

    params = {"dns_search": "example.test"}
    paths = Paths(tmp_path / "etc", tmp_path / "cache")
    with pytest.raises(ParameterError, match="dns_search needs dns_nameservers"):
        run_verify(GanetiEnv(20, "cloudimage", "debian-12", 0, params), paths, ["parameters"])
    with pytest.raises(ParameterError, match="dns_search needs dns_nameservers"):
        seed_input(genv(params), variants("debian-12"))
    assert check_variant_parameters(params | {"network": "none"}, variants("debian-12")) == []
    seed_input(genv(params | {"dns_nameservers": "192.0.2.53"}), variants("debian-12"))


def test_configdrive_carries_the_instance_id(variants: Callable[[str], Variant]) -> None:
    inp = seed_input(genv(), variants("debian-12"))
    drive = build_configdrive(inp).files
    assert read_instance_id(drive["openstack/latest/meta_data.json"]) == UUID
