"""Every seed we build, read back by Debian's real cloud-init (22.4 on Debian 12).

tests/cloudinit_reader.py runs under /usr/bin/python3 with cloud-init's NoCloud and ConfigDrive
datasources, its user-data processor and part handlers, its config merger, cc_users_groups and
cc_set_passwords (with the host-changing calls recorded), and its network parser with the eni,
networkd and sysconfig renderers (never netplan).  No root needed; nothing outside tmp_path is
written.
"""

from __future__ import annotations

import base64
import gzip
import http.server
import ipaddress
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from instance_cloudimage.ganeti.env import GanetiEnv, Instance, Network, Nic
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.seed.configdrive import build_configdrive
from instance_cloudimage.seed.content import SeedFiles, SeedInput, build_nocloud, rename_seed_input, seed_input
from instance_cloudimage.seed.network import eui64_address
from instance_cloudimage.seed.userdata import OUR_MERGE_TYPE
from tests.conftest import need_tools
from tests.support import delivery_helpers as dh

pytestmark = pytest.mark.integration

READER = Path(__file__).resolve().parents[1] / "support" / "cloudinit_reader.py"
SYSTEM_PYTHON = "/usr/bin/python3"
UUID = "68c41cfd-8b97-4cda-8ba0-674afdb4b6bd"
HASH = "$y$j9T$F31F/jItUvvjOv6IBFNea/$SFRtZtCIUWcnypijZA5cTGTLcjo306tI.KLnmc0noD1"
ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM2ziK4RM0utYUnNU57yaVLln5aVvIYlUM/oaMR+Tcc1 alice@example"
ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXg0BvBqVzZSmaYdnQd4dOYZDsaSX0WrFsMiDI8/NMg bob@example"
ED3 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ2KTnNxkVQYDzwH2pGMjhzvFAzO0ZbbM4iEZ1Db/Hay carol@example"

PUB = Network(name="pub", subnet=ipaddress.IPv4Network("192.0.2.0/24"), gateway=ipaddress.IPv4Address("192.0.2.1"))
DUAL = Network(name="dual", subnet=ipaddress.IPv4Network("198.51.100.0/24"),
               gateway=ipaddress.IPv4Address("198.51.100.1"), subnet6=ipaddress.IPv6Network("2001:db8:1::/64"),
               gateway6=ipaddress.IPv6Address("2001:db8:1::1"))
V6ONLY = Network(name="v6", subnet6=ipaddress.IPv6Network("2001:db8:2::/64"),
                 gateway6=ipaddress.IPv6Address("2001:db8:2::1"))
COMM = Network(name="gnt-com", subnet=ipaddress.IPv4Network("169.254.0.0/16"),
               subnet6=ipaddress.IPv6Network("fe80::/10"))


def _mac(i: int) -> str:
    return f"aa:00:00:00:00:{i + 1:02x}"


NIC_STATIC = Nic(0, _mac(0), ip=ipaddress.IPv4Address("192.0.2.10"), network=PUB)
NIC_COMM = Nic(2, "52:54:00:12:34:56", ip=ipaddress.IPv4Address("169.254.10.20"), network=COMM,
               name="ganeti:communication:inst1.example.test")


@pytest.fixture(scope="module", autouse=True)
def cloud_init_available() -> None:
    r = subprocess.run([SYSTEM_PYTHON, "-c", "import cloudinit.version as v; print(v.version_string())"],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's cloud-init (apt-get install cloud-init)")
        pytest.skip("Debian's cloud-init is not installed")


@pytest.fixture
def variants(tmp_path: Path) -> Callable[[str], Variant]:
    return dh.variant_loader(tmp_path, old_ci_user="debian")


def make_input(variant: Variant, params: Mapping[str, str] | None = None, nics: tuple[Nic, ...] = (NIC_STATIC,),
               name: str = "inst1.example.test", reinstall: bool = False) -> SeedInput:
    inst = Instance(name=name, uuid=UUID, os=f"cloudimage+{variant.name}", hypervisor="kvm", primary_node=None,
                    secondary_nodes=(), disks=(), nics=nics, reinstall=reinstall)
    genv = GanetiEnv(api_version=20, os_name="cloudimage", variant=variant.name, debug_level=0,
                     params=dict(params or {}), instance=inst)
    return seed_input(genv, variant)


@pytest.fixture
def read(tmp_path: Path) -> Callable[[str, SeedFiles], dict[str, Any]]:
    counter = iter(range(1000))

    def run(kind: str, seed: SeedFiles) -> dict[str, Any]:
        n = next(counter)
        src = tmp_path / f"seed{n}"
        for rel, data in seed.files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        src.mkdir(exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "NO_PROXY": "*", "no_proxy": "*"}
        r = subprocess.run([SYSTEM_PYTHON, str(READER), kind, str(src), str(tmp_path / f"work{n}")],
                           capture_output=True, text=True, env=env, check=False)
        assert r.returncode == 0, r.stderr
        out: dict[str, Any] = json.loads(r.stdout)
        assert out["claimed"] is True
        return out

    return run


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def files_of(out: dict[str, Any], suffix: str) -> str:
    (text,) = [v for k, v in out["network"]["files"].items() if k.endswith(suffix)]
    return str(text)


# --- NoCloud: identity, keys, password, network -------------------------------------------------

def test_nocloud_one_static_nic_with_keys_password_and_merged_cloud_config(
        variants: Callable[[str], Variant], read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    user_data = f"#cloud-config\npackages: [htop]\nssh_authorized_keys: ['{ED3}']\n"
    inp = make_input(variants("debian-12"), {
        "ssh_authorized_keys": f"{ED};{ED2}", "password_hash": HASH, "user_data": user_data,
        "dns_nameservers": "192.0.2.53 2001:db8::53", "dns_search": "example.test"})
    out = read("nocloud", build_nocloud(inp))

    assert out["dsname"] == "NoCloud" and out["instance_id"] == UUID
    assert (out["hostname"], out["fqdn"]) == ("inst1", "inst1.example.test")
    assert out["public_keys"] == [ED, ED2]
    assert out["authorized_keys"].splitlines() == [ED, ED2, ED3]  # metadata keys and the user's, none lost
    assert out["default_user"] == "debian"
    (created,) = out["calls"]["create_user"]
    assert created["name"] == "debian" and created["hashed_passwd"] == HASH and created["lock_passwd"] is False
    assert out["calls"]["chpasswd"] == []  # no plain-text path anywhere
    assert out["merged"]["packages"] == ["htop"] and out["merged"]["manage_etc_hosts"] == "localhost"
    assert [p["content_type"] for p in out["parts"]] == ["text/cloud-config"]

    (iface,) = out["network"]["interfaces"]
    assert iface["name"] == "eth0" and iface["mac_address"] == _mac(0)
    (subnet,) = iface["subnets"]
    assert (subnet["address"], subnet["prefix"], subnet["gateway"]) == ("192.0.2.10", 24, "192.0.2.1")
    # The IPv6 server is left out: eth0 has no IPv6 (NetworkManager would refuse the connection).
    assert out["network"]["dns_nameservers"] == ["192.0.2.53"]
    assert out["network"]["dns_searchdomains"] == ["example.test"]
    eni = files_of(out, "etc/network/interfaces")
    assert "iface eth0 inet static" in eni and "address 192.0.2.10/24" in eni and "gateway 192.0.2.1" in eni
    assert "route add" not in eni  # the gateway is native ifupdown, not a net-tools post-up line
    networkd = files_of(out, "10-cloud-init-eth0.network")
    assert "MACAddress=aa:00:00:00:00:01" in networkd and "Address=192.0.2.10/24" in networkd
    assert "Gateway=192.0.2.1" in networkd and "DNS=192.0.2.53\n" in networkd
    assert 'ATTR{address}=="aa:00:00:00:00:01", NAME="eth0"' in files_of(out, "70-persistent-net.rules")
    sysconfig = files_of(out, "ifcfg-eth0")
    for line in ("IPADDR=192.0.2.10", "GATEWAY=192.0.2.1", "HWADDR=aa:00:00:00:00:01", "NETMASK=255.255.255.0"):
        assert line in sysconfig


def test_nocloud_two_nics_one_default_route(variants: Callable[[str], Variant],
                                            read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    nics = (Nic(0, _mac(0)), Nic(1, _mac(1), ip=ipaddress.IPv4Address("192.0.2.11"), network=PUB))
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), nics=nics)))
    eth0, eth1 = out["network"]["interfaces"]
    assert (eth0["name"], eth0["subnets"][0]["type"], eth0["subnets"][0]["metric"]) == ("eth0", "dhcp4", 1000)
    assert eth1["subnets"][0]["gateway"] == "192.0.2.1"
    eni = files_of(out, "etc/network/interfaces")
    assert eni.count("gateway ") == 1 and "metric 1000" in eni
    eth0_networkd = files_of(out, "10-cloud-init-eth0.network")
    assert "UseRoutes=False" in eth0_networkd and "Gateway" not in eth0_networkd
    assert "Gateway=192.0.2.1" in files_of(out, "10-cloud-init-eth1.network")


def test_nocloud_three_nics_dual_stack_dhcp_and_communication(
        variants: Callable[[str], Variant], read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    nics = (Nic(0, _mac(0), ip=ipaddress.IPv4Address("198.51.100.7"), network=DUAL), Nic(1, _mac(1)), NIC_COMM)
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"dns_nameservers": "192.0.2.53"},
                                                   nics=nics)))
    eui = eui64_address(_mac(0), ipaddress.IPv6Network("2001:db8:1::/64"))
    names = [i["name"] for i in out["network"]["interfaces"]]
    assert names == ["eth0", "eth1", "eth2"]
    eth0 = files_of(out, "10-cloud-init-eth0.network")
    for line in ("Address=198.51.100.7/24", f"Address={eui}/64", "Gateway=198.51.100.1", "Gateway=2001:db8:1::1",
                 "DNS=192.0.2.53"):
        assert line in eth0
    comm = files_of(out, "10-cloud-init-eth2.network")
    for line in ("MACAddress=52:54:00:12:34:56", "DHCP=ipv4", "UseRoutes=False", "UseDNS=False",
                 "RouteMetric=10000"):
        assert line in comm
    assert "\nDNS=" not in comm and "Gateway" not in comm
    eni = files_of(out, "etc/network/interfaces")
    assert f"address {eui}/64" in eni and "gateway 2001:db8:1::1" in eni
    assert "iface eth2 inet dhcp" in eni and "metric 10000" in eni
    assert eni.count("gateway 198.51.100.1") == 1
    sysconfig = files_of(out, "ifcfg-eth0")
    assert f"IPV6ADDR={eui}/64" in sysconfig and "IPV6_DEFAULTGW=2001:db8:1::1" in sysconfig


def test_nocloud_ipv6_only_nic(variants: Callable[[str], Variant],
                               read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    nics = (Nic(0, _mac(0), ip=ipaddress.IPv6Address("2001:db8:2::42"), network=V6ONLY),)
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), nics=nics)))
    (iface,) = out["network"]["interfaces"]
    (subnet,) = iface["subnets"]
    assert (subnet["type"], subnet["address"], subnet["prefix"]) == ("static", "2001:db8:2::42", 64)
    assert subnet["gateway"] == "2001:db8:2::1"
    assert "DHCP=no" in files_of(out, "10-cloud-init-eth0.network")


def test_nocloud_network_config_v1(variants: Callable[[str], Variant],
                                   read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    nics = (Nic(0, _mac(0), ip=ipaddress.IPv4Address("198.51.100.7"), network=DUAL), Nic(1, _mac(1)), NIC_COMM)
    out = read("nocloud", build_nocloud(make_input(variants("old-ci"), {"dns_nameservers": "192.0.2.53"}, nics=nics)))
    assert out["network_config"]["version"] == 1
    eth0, eth1, eth2 = out["network"]["interfaces"]
    assert [s["type"] for s in eth0["subnets"]] == ["static", "static6"]
    assert eth0["subnets"][0]["gateway"] == "198.51.100.1" and eth0["subnets"][1]["gateway"] == "2001:db8:1::1"
    assert eth1["subnets"][0]["metric"] == 1001 and eth2["subnets"][0]["metric"] == 10000
    assert "DNS=192.0.2.53" in files_of(out, "10-cloud-init-eth0.network")
    assert "\nDNS=" not in files_of(out, "10-cloud-init-eth2.network")
    assert 'NAME="eth2"' in files_of(out, "70-persistent-net.rules")


def test_nocloud_network_dhcp_and_none(variants: Callable[[str], Variant],
                                       read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"network": "dhcp"})))
    (iface,) = out["network"]["interfaces"]
    assert [s["type"] for s in iface["subnets"]] == ["dhcp4"]
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"network": "none"})))
    assert out["network_config"] is None


def netplan_generate(root: Path, network_config: bytes) -> dict[str, str]:
    """What netplan makes of our v2 config, as cloud-init 22.4 passes v2 through to it (wrapped in
    'network:').  --root-dir keeps netplan inside ``root``."""
    need_tools("netplan")
    netplan = shutil.which("netplan", path="/usr/sbin:/usr/bin:/sbin:/bin") or "netplan"
    conf = root / "etc" / "netplan" / "50-cloud-init.yaml"
    conf.parent.mkdir(parents=True)
    conf.write_text(yaml.safe_dump({"network": yaml.safe_load(network_config)}))
    conf.chmod(0o600)
    r = subprocess.run([netplan, "generate", "--root-dir", str(root)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "Error" not in r.stderr
    out = root / "run" / "systemd" / "network"
    return {p.name: p.read_text() for p in out.iterdir()}


def test_v2_network_config_is_what_netplan_accepts(variants: Callable[[str], Variant], tmp_path: Path) -> None:
    nics = (Nic(0, _mac(0), ip=ipaddress.IPv4Address("198.51.100.7"), network=DUAL), Nic(1, _mac(1)), NIC_COMM)
    inp = make_input(variants("debian-12"), {"dns_nameservers": "192.0.2.53", "dns_search": "example.test"},
                     nics=nics)
    files = netplan_generate(tmp_path / "np1", build_nocloud(inp).files["network-config"])
    eui = eui64_address(_mac(0), ipaddress.IPv6Network("2001:db8:1::/64"))
    link = files["10-netplan-eth0.link"]
    assert "Name=eth0" in link and f"PermanentMACAddress={_mac(0)}" in link
    eth0 = files["10-netplan-eth0.network"]
    for line in ("Address=198.51.100.7/24", f"Address={eui}/64", "Gateway=198.51.100.1", "Gateway=2001:db8:1::1",
                 "IPv6AcceptRA=no", "DNS=192.0.2.53", "Domains=example.test"):
        assert line in eth0
    eth1 = files["10-netplan-eth1.network"]
    assert "DHCP=ipv4" in eth1 and "UseRoutes=false" in eth1 and "RouteMetric=1001" in eth1
    comm = files["10-netplan-eth2.network"]
    for line in ("DHCP=ipv4", "UseRoutes=false", "UseDNS=false", "RouteMetric=10000", "RequiredForOnline=no"):
        assert line in comm
    assert "Name=eth2" in files["10-netplan-eth2.link"]
    v6only = make_input(variants("debian-12"),
                        nics=(Nic(0, _mac(0), ip=ipaddress.IPv6Address("2001:db8:2::42"), network=V6ONLY),))
    eth0 = netplan_generate(tmp_path / "np2", build_nocloud(v6only).files["network-config"])["10-netplan-eth0.network"]
    assert "Address=2001:db8:2::42/64" in eth0 and "Gateway=2001:db8:2::1" in eth0 and "DHCP" not in eth0


# --- NoCloud: every kind of user-data -----------------------------------------------------------

def test_script_user_data_is_kept_whole_beside_our_part(variants: Callable[[str], Variant],
                                                       read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    script = "#!/bin/sh\n# Grüße\necho hello > /tmp/marker\n"
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"user_data": script,
                                                                           "password_hash": HASH})))
    assert [p["content_type"] for p in out["parts"]] == ["text/x-shellscript", "text/cloud-config"]
    assert out["parts"][0]["payload"] == script and out["parts"][1]["merge_type"] == OUR_MERGE_TYPE
    assert list(out["scripts"].values()) == [script]  # what cc_scripts_user would run
    assert out["merged"]["manage_etc_hosts"] == "localhost"
    assert out["calls"]["create_user"][0]["hashed_passwd"] == HASH


def test_base64_and_gzip_user_data(variants: Callable[[str], Variant],
                                   read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    cfg = "#cloud-config\npackages: [gzipped]\nmanage_etc_hosts: false\n"
    value = "base64:" + base64.b64encode(gzip.compress(cfg.encode())).decode()
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"user_data": value})))
    assert out["merged"]["packages"] == ["gzipped"]
    assert out["merged"]["manage_etc_hosts"] is False  # the user's value wins over ours
    script = "#!/bin/bash\necho b64\n"
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {
        "user_data": "base64:" + base64.b64encode(script.encode()).decode()})))
    assert list(out["scripts"].values()) == [script]


def test_mime_user_data_is_nested_and_merged_by_cloud_init(variants: Callable[[str], Variant],
                                                          read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    mime = ('Content-Type: multipart/mixed; boundary="==USER=="\nMIME-Version: 1.0\n\n'
            '--==USER==\nContent-Type: text/cloud-config; charset="us-ascii"\n\n'
            "#cloud-config\npackages: [from-mime]\nmanage_etc_hosts: true\n\n"
            '--==USER==\nContent-Type: text/x-shellscript; charset="us-ascii"\n\n#!/bin/sh\necho mime\n\n'
            "--==USER==--\n")
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"user_data": mime,
                                                                           "password_hash": HASH})))
    assert [p["content_type"] for p in out["parts"]] == ["text/cloud-config", "text/x-shellscript",
                                                         "text/cloud-config"]
    assert out["merged"]["packages"] == ["from-mime"]
    assert out["merged"]["manage_etc_hosts"] is True  # theirs wins, ours is merged with no_replace
    assert out["merged"]["user"]["hashed_passwd"] == HASH  # and ours still arrives
    assert list(out["scripts"].values()) == ["#!/bin/sh\necho mime\n"]


def test_include_user_data_is_fetched_and_merged(variants: Callable[[str], Variant], http_dir: tuple[Path, str],
                                                read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    root, url = http_dir
    (root / "base.yaml").write_text("#cloud-config\npackages: [included]\nmanage_etc_hosts: false\n"
                                    f"ssh_authorized_keys: ['{ED3}']\n")
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {
        "user_data": f"#include\n{url}/base.yaml\n", "ssh_authorized_keys": ED})))
    assert out["merged"]["packages"] == ["included"] and out["merged"]["manage_etc_hosts"] is False
    assert out["authorized_keys"].splitlines() == [ED, ED3]


def test_jinja_user_data_is_rendered_with_instance_data(variants: Callable[[str], Variant],
                                                       read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    template = "## template: jinja\n#cloud-config\nruncmd:\n  - echo {{ v1.local_hostname }} {{ v1.instance_id }}\n"
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"user_data": template})))
    assert out["parts"][0]["content_type"] == "text/jinja2"
    assert out["merged"]["runcmd"] == [f"echo inst1 {UUID}"]
    assert out["merged"]["manage_etc_hosts"] == "localhost"


def test_opaque_json_user_data_stays_intact(variants: Callable[[str], Variant],
                                           read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    doc = '{"role": "db", "replicas": 3}\n'
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"user_data": doc,
                                                                           "password_hash": HASH})))
    assert out["userdata_raw"] == doc
    assert [p["content_type"] for p in out["vendor_parts"]] == ["text/cloud-config"]
    assert out["merged"]["manage_etc_hosts"] == "localhost"
    assert out["calls"]["create_user"][0]["hashed_passwd"] == HASH


def test_boothook_is_handed_over_not_run(variants: Callable[[str], Variant],
                                        read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    hook = "#cloud-boothook\n#!/bin/sh\necho early\n"
    out = read("nocloud", build_nocloud(make_input(variants("debian-12"), {"user_data": hook})))
    assert [p["content_type"] for p in out["parts"]] == ["text/cloud-boothook", "text/cloud-config"]
    assert out["parts"][0]["payload"] == hook


def test_reinstall_and_rename(variants: Callable[[str], Variant],
                              read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    first = read("nocloud", build_nocloud(make_input(variants("debian-12"))))
    reinstalled = build_nocloud(make_input(variants("debian-12"), reinstall=True))
    again = read("nocloud", reinstalled)
    assert first["instance_id"] == UUID and again["instance_id"] not in (UUID, "nocloud")
    renamed = rename_seed_input(make_input(variants("debian-12"), name="web2.example.test"),
                                reinstalled.files["meta-data"])
    out = read("nocloud", build_nocloud(renamed))
    assert out["instance_id"] == again["instance_id"] and out["fqdn"] == "web2.example.test"


# --- config drive ----------------------------------------------------------------------------

def test_configdrive_for_cloud_init(variants: Callable[[str], Variant],
                                   read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    nics = (NIC_STATIC, Nic(1, _mac(1)), NIC_COMM)
    inp = make_input(variants("debian-12"), {"ssh_authorized_keys": f"{ED}\n{ED2}", "password_hash": HASH,
                                             "dns_nameservers": "192.0.2.53", "dns_search": "example.test",
                                             "user_data": "#!/bin/sh\necho cd\n"}, nics=nics)
    out = read("configdrive", build_configdrive(inp))
    assert out["dsname"] == "ConfigDrive" and out["instance_id"] == UUID
    assert (out["hostname"], out["fqdn"]) == ("inst1", "inst1.example.test")
    assert sorted(out["public_keys"]) == sorted([ED, ED2])
    assert out["calls"]["create_user"][0]["hashed_passwd"] == HASH
    assert list(out["scripts"].values()) == ["#!/bin/sh\necho cd\n"]
    names = [(i["name"], i["mac_address"]) for i in out["network"]["interfaces"]]
    assert names == [("eth0", _mac(0)), ("eth1", _mac(1)), ("eth2", "52:54:00:12:34:56")]
    eth0 = out["network"]["interfaces"][0]["subnets"][0]
    assert (eth0["address"], eth0["prefix"], eth0["gateway"]) == ("192.0.2.10", 24, "192.0.2.1")
    eni = files_of(out, "etc/network/interfaces")
    assert eni.count("gateway ") == 1 and "metric 1001" in eni and "metric 10000" in eni
    assert "dns-search example.test" in eni
    # On eth0's subnet only: a global entry (Nova's dns services) would reach every NIC.
    assert out["network"]["dns_nameservers"] == [] and eth0["dns_nameservers"] == ["192.0.2.53"]
    assert "dns-nameservers 192.0.2.53" in eni


def test_configdrive_opaque_user_data_uses_vendor_data(variants: Callable[[str], Variant],
                                                      read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    doc = '["free", "json"]'
    out = read("configdrive", build_configdrive(make_input(variants("debian-12"), {"user_data": doc})))
    assert out["userdata_raw"] == doc
    assert out["merged"]["manage_etc_hosts"] == "localhost"


def test_configdrive_for_flamingo_is_valid_for_cloud_init_too(
        variants: Callable[[str], Variant], read: Callable[[str, SeedFiles], dict[str, Any]]) -> None:
    inp = make_input(variants("flamingo-test"), {"ssh_authorized_keys": f"{ED};{ED2}", "password_hash": HASH,
                                                 "user_data": "#cloud-config\nruncmd: [touch /flag]\n"})
    drive = build_configdrive(inp)
    ud = drive.files["openstack/2012-08-10/user_data"]
    assert ud.startswith(b"#cloud-config\n")
    meta = json.loads(drive.files["openstack/2012-08-10/meta_data.json"])
    assert meta["public_keys"] == {"root": f"{ED}\n{ED2}"} and meta["hostname"] == "inst1.example.test"
    out = read("configdrive", drive)
    assert out["instance_id"] == UUID and out["fqdn"] == "inst1.example.test"
    assert out["merged"]["runcmd"] == [["usermod", "-p", HASH, "root"], "touch /flag"]
    # The user-keyed public_keys value holds both keys on two lines; cloud-init (which treats each
    # value as one key) still writes both lines.  The user_data repeat adds them again for root.
    assert out["authorized_keys"].splitlines() == [ED, ED2, ED, ED2]


# --- cloud-init's own schema check on every cloud-config we generate ---------------------------

def test_generated_cloud_configs_pass_cloud_init_schema(variants: Callable[[str], Variant], tmp_path: Path) -> None:
    docs: list[bytes] = []
    for params in ({}, {"password_hash": HASH},
                   {"password_hash": HASH, "user_data": "#cloud-config\npackages: [htop]\nuser: {name: bob}\n"}):
        docs.append(build_nocloud(make_input(variants("debian-12"), params)).files["user-data"])
    docs.append(build_nocloud(make_input(variants("debian-12"), {"user_data": "{}"})).files["vendor-data"])
    mime = build_nocloud(make_input(variants("debian-12"), {"user_data": "#!/bin/sh\n", "password_hash": HASH}))
    ours = mime.files["user-data"].decode().split("#cloud-config\n", 1)[1].split("\n--", 1)[0]
    docs.append(("#cloud-config\n" + ours).encode())
    flamingo = make_input(variants("flamingo-test"), {"ssh_authorized_keys": ED, "password_hash": HASH,
                                                      "user_data": "#!/bin/sh\necho hi\n"})
    docs.append(build_configdrive(flamingo).files["openstack/latest/user_data"])
    for i, doc in enumerate(docs):
        assert yaml.safe_load(doc)  # not empty
        path = tmp_path / f"cc{i}.yaml"
        path.write_bytes(doc)
        r = subprocess.run(["/usr/bin/cloud-init", "schema", "-c", str(path)], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0 and "Valid cloud-config" in r.stdout, (i, r.stdout, r.stderr)
