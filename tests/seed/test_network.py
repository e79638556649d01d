"""Network plan and its renderings (v2, v1, network_data.json) from Ganeti NICs."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from instance_cloudimage.ganeti.env import Network, Nic
from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.seed.network import (
    COMMUNICATION_METRIC,
    SECONDARY_METRIC,
    NetworkPlan,
    check_dns_parameters,
    eui64_address,
    plan_network,
    render_network_data,
    render_v1,
    render_v2,
)

ip = ipaddress.ip_address
v4, v6 = ipaddress.IPv4Address, ipaddress.IPv6Address
n4, n6 = ipaddress.IPv4Network, ipaddress.IPv6Network

PUB = Network(name="pub", subnet=n4("192.0.2.0/24"), gateway=v4("192.0.2.1"))
DUAL = Network(name="dual", subnet=n4("198.51.100.0/24"), gateway=v4("198.51.100.1"),
               subnet6=n6("2001:db8:1::/64"), gateway6=v6("2001:db8:1::1"))
V6ONLY = Network(name="v6", subnet6=n6("2001:db8:2::/64"), gateway6=v6("2001:db8:2::1"))
COMM = Network(name="gnt-com", subnet=n4("169.254.0.0/16"), subnet6=n6("fe80::/10"))


def nic(index: int, address: str | None = None, network: Network | None = None, name: str | None = None) -> Nic:
    return Nic(index=index, mac=f"aa:00:00:00:00:{index + 1:02x}", ip=ip(address) if address else None,
               network=network, name=name)


def comm_nic(index: int) -> Nic:
    return Nic(index=index, mac="52:54:00:12:34:56", ip=ip("169.254.10.20"), network=COMM,
               name="ganeti:communication:inst1.example.test")


def v2(nics: list[Nic], mode: str = "auto", **kw: Any) -> dict[str, Any]:
    plan = plan_network(nics, mode, **kw)
    assert plan is not None
    eths: dict[str, Any] = render_v2(plan)["ethernets"]
    return eths


def test_every_nic_is_matched_by_mac_with_a_stable_name() -> None:
    eths = v2([nic(0), nic(1, "192.0.2.10", PUB), comm_nic(2)])
    assert list(eths) == ["eth0", "eth1", "eth2"]
    for name, eth in eths.items():
        assert eth["set-name"] == name
        assert eth["match"] == {"macaddress": {"eth0": "aa:00:00:00:00:01", "eth1": "aa:00:00:00:00:02",
                                               "eth2": "52:54:00:12:34:56"}[name]}


def test_one_nic_without_network_uses_dhcp_and_keeps_its_routes() -> None:
    assert v2([nic(0)]) == {"eth0": {"match": {"macaddress": "aa:00:00:00:00:01"}, "set-name": "eth0",
                                     "dhcp4": True}}


def test_static_ipv4_from_ganeti_network() -> None:
    eth = v2([nic(0, "192.0.2.10", PUB)])["eth0"]
    assert eth["dhcp4"] is False
    assert eth["addresses"] == ["192.0.2.10/24"] and eth["gateway4"] == "192.0.2.1"
    assert "routes" not in eth


@pytest.mark.parametrize("nics", [
    [nic(0, "192.0.2.10")],                              # IP but no network (e.g. routed mode)
    [nic(0, "203.0.113.5", PUB)],                        # IP outside the network's subnet
    [nic(0, None, PUB)],                                 # network but no IP
])
def test_dhcp_when_ganeti_gave_no_usable_ip(nics: list[Nic]) -> None:
    eth = v2(nics)["eth0"]
    assert eth["dhcp4"] is True and "addresses" not in eth and "gateway4" not in eth


def test_gateway_outside_the_subnet_is_not_used() -> None:
    odd = Network(name="odd", subnet=n4("192.0.2.0/24"), gateway=v4("203.0.113.1"))
    eth = v2([nic(0, "192.0.2.10", odd)])["eth0"]
    assert eth["addresses"] == ["192.0.2.10/24"] and "gateway4" not in eth


def test_eui64_matches_rfc4291() -> None:
    assert eui64_address("52:54:00:12:34:56", n6("2001:db8::/64")) == v6("2001:db8::5054:ff:fe12:3456")
    assert eui64_address("02:00:00:00:00:01", n6("2001:db8::/64")) == v6("2001:db8::ff:fe00:1")


def test_dual_stack_static_v4_and_eui64_v6_with_both_gateways() -> None:
    eth = v2([nic(0, "198.51.100.7", DUAL)])["eth0"]
    eui = eui64_address("aa:00:00:00:00:01", n6("2001:db8:1::/64"))
    assert eth["addresses"] == ["198.51.100.7/24", f"{eui}/64"] and str(eui) == "2001:db8:1:0:a800:ff:fe00:1"
    assert eth["gateway4"] == "198.51.100.1" and eth["gateway6"] == "2001:db8:1::1"
    assert eth["accept-ra"] is False and eth["dhcp4"] is False


def test_ipv6_nic_ip_on_a_v6_only_network() -> None:
    eth = v2([nic(0, "2001:db8:2::42", V6ONLY)])["eth0"]
    assert eth["addresses"] == ["2001:db8:2::42/64"] and eth["gateway6"] == "2001:db8:2::1"
    assert eth["dhcp4"] is False  # nothing to ask DHCPv4 for on a v6-only network
    assert "gateway4" not in eth


def test_subnet6_narrower_than_64_gets_no_derived_address() -> None:
    narrow = Network(name="n", subnet6=n6("2001:db8:3::/80"), gateway6=v6("2001:db8:3::1"))
    eth = v2([nic(0, None, narrow)])["eth0"]
    assert "addresses" not in eth and "gateway6" not in eth


def test_two_static_nics_only_the_first_gets_the_default_route() -> None:
    other = Network(name="b", subnet=n4("203.0.113.0/24"), gateway=v4("203.0.113.1"))
    eths = v2([nic(0, "192.0.2.10", PUB), nic(1, "203.0.113.10", other)])
    assert eths["eth0"]["gateway4"] == "192.0.2.1"
    assert "gateway4" not in eths["eth1"] and eths["eth1"]["addresses"] == ["203.0.113.10/24"]


def test_static_gateway_beats_an_earlier_dhcp_nic() -> None:
    eths = v2([nic(0), nic(1, "192.0.2.10", PUB)], nameservers=["192.0.2.53"])
    assert eths["eth1"]["gateway4"] == "192.0.2.1"
    assert eths["eth0"]["dhcp4-overrides"] == {"use-routes": False, "route-metric": SECONDARY_METRIC}
    assert "nameservers" in eths["eth1"] and "nameservers" not in eths["eth0"]


def test_two_dhcp_nics_only_the_first_keeps_dhcp_routes() -> None:
    eths = v2([nic(0), nic(1)])
    assert "dhcp4-overrides" not in eths["eth0"]
    assert eths["eth1"]["dhcp4-overrides"] == {"use-routes": False, "route-metric": SECONDARY_METRIC + 1}


def test_communication_nic_dhcp_without_routes_or_dns_and_optional() -> None:
    eths = v2([nic(0, "192.0.2.10", PUB), nic(1), comm_nic(2)], nameservers=["192.0.2.53"], search=["example"])
    comm = eths["eth2"]
    assert comm["dhcp4"] is True and "addresses" not in comm  # DHCP, even though Ganeti gave it an IP
    assert comm["dhcp4-overrides"] == {"use-routes": False, "route-metric": COMMUNICATION_METRIC, "use-dns": False}
    assert comm["optional"] is True and "nameservers" not in comm
    assert eths["eth0"]["nameservers"] == {"addresses": ["192.0.2.53"], "search": ["example"]}


def test_only_a_communication_nic_gets_no_default_route() -> None:
    eths = v2([comm_nic(0)])
    assert eths["eth0"]["dhcp4-overrides"]["use-routes"] is False


def test_mode_dhcp_ignores_ganeti_addresses() -> None:
    eths = v2([nic(0, "198.51.100.7", DUAL), nic(1), comm_nic(2)], mode="dhcp")
    assert all(e["dhcp4"] for e in eths.values())
    assert not any("addresses" in e or "gateway4" in e or "gateway6" in e for e in eths.values())
    assert "dhcp4-overrides" not in eths["eth0"] and eths["eth1"]["dhcp4-overrides"]["use-routes"] is False


def test_mode_none_and_no_nics_give_no_plan() -> None:
    assert plan_network([nic(0)], "none") is None
    assert plan_network([], "auto") is None
    with pytest.raises(ValueError):
        plan_network([nic(0)], "static")


def _plan(nics: list[Nic], **kw: Any) -> NetworkPlan:
    plan = plan_network(nics, "auto", **kw)
    assert plan is not None
    return plan


def test_v1_rendering() -> None:
    plan = _plan([nic(0, "198.51.100.7", DUAL), nic(1), comm_nic(2)], nameservers=["192.0.2.53"], search=["ex"])
    cfg = render_v1(plan)
    assert cfg["version"] == 1
    eth0, eth1, eth2 = cfg["config"]
    assert eth0 == {"type": "physical", "name": "eth0", "mac_address": "aa:00:00:00:00:01", "accept-ra": False,
                    "subnets": [{"type": "static", "address": "198.51.100.7/24", "gateway": "198.51.100.1",
                                 "dns_nameservers": ["192.0.2.53"], "dns_search": ["ex"]},
                                {"type": "static6", "address": eth0["subnets"][1]["address"],
                                 "gateway": "2001:db8:1::1"}]}
    assert eth0["subnets"][1]["address"].endswith("/64")
    assert eth1["subnets"] == [{"type": "dhcp4", "metric": SECONDARY_METRIC + 1}]
    assert eth2["subnets"] == [{"type": "dhcp4", "metric": COMMUNICATION_METRIC}]


def test_network_data_rendering() -> None:
    plan = _plan([nic(0, "198.51.100.7", DUAL), comm_nic(1)], nameservers=["192.0.2.53", "2001:db8::53"],
                 search=["example.test"])
    nd = render_network_data(plan)
    assert nd["links"] == [
        {"id": "eth0", "name": "eth0", "type": "phy", "ethernet_mac_address": "aa:00:00:00:00:01"},
        {"id": "eth1", "name": "eth1", "type": "phy", "ethernet_mac_address": "52:54:00:12:34:56"}]
    v4, v6, comm = nd["networks"]
    assert v4 == {"id": "network0", "link": "eth0", "type": "ipv4", "ip_address": "198.51.100.7",
                  "netmask": "255.255.255.0", "gateway": "198.51.100.1", "dns_search": ["example.test"],
                  "dns_nameservers": ["192.0.2.53", "2001:db8::53"]}
    assert v6["type"] == "ipv6" and v6["gateway"] == "2001:db8:1::1" and v6["netmask"] == "ffff:ffff:ffff:ffff::"
    assert comm == {"id": "network2", "link": "eth1", "type": "ipv4_dhcp", "metric": COMMUNICATION_METRIC}
    assert nd["services"] == []  # global: it would reach the communication NIC too


def test_dns_on_a_dhcp_only_nic_is_also_global_in_v1_and_network_data() -> None:
    """sysconfig and netplan read DNS from static subnets only; the global form (which cloud-init
    22.4 accepts only with a server) reaches resolv.conf on RHEL."""
    plan = _plan([nic(0), comm_nic(1)], nameservers=["192.0.2.53"], search=["example.test"])
    cfg = render_v1(plan)["config"]
    assert cfg[0]["subnets"] == [{"type": "dhcp4", "dns_nameservers": ["192.0.2.53"], "dns_search": ["example.test"]}]
    assert cfg[-1] == {"type": "nameserver", "address": ["192.0.2.53"], "search": ["example.test"]}
    nd = render_network_data(plan)
    assert nd["networks"][0]["dns_nameservers"] == ["192.0.2.53"]
    assert nd["services"] == [{"type": "dns", "address": "192.0.2.53", "search": ["example.test"]}]
    static = _plan([nic(0, "192.0.2.10", PUB)], nameservers=["192.0.2.53"])
    assert [c["type"] for c in render_v1(static)["config"]] == ["physical"]


def test_dns_servers_of_an_ip_version_the_dns_nic_lacks_are_left_out(caplog: pytest.LogCaptureFixture) -> None:
    v4_only = _plan([nic(0, "192.0.2.10", PUB)], nameservers=["2001:db8::53", "192.0.2.53"], search=["ex"])
    assert v4_only.nameservers == ("192.0.2.53",) and v4_only.search == ("ex",)
    assert "entries 1 are not used: eth0" in caplog.text and "2001:db8" not in caplog.text  # no values logged
    v6_only = _plan([nic(0, "2001:db8:2::42", V6ONLY)], nameservers=["192.0.2.53"], search=["ex"])
    assert (v6_only.nameservers, v6_only.search) == ((), ())
    assert not any(p.dns for p in v6_only.nics) and "nameservers" not in render_v2(v6_only)["ethernets"]["eth0"]
    dual = _plan([nic(0, "198.51.100.7", DUAL)], nameservers=["2001:db8::53", "192.0.2.53"])
    assert dual.nameservers == ("2001:db8::53", "192.0.2.53")


@pytest.mark.parametrize("mode", ["auto", "dhcp"])
def test_search_domains_without_a_server_are_refused(mode: str) -> None:
    with pytest.raises(ParameterError, match="dns_search needs dns_nameservers"):
        check_dns_parameters(mode, (), ("example.test",))
    check_dns_parameters("none", (), ("example.test",))  # nothing is written
    check_dns_parameters(mode, ("192.0.2.53",), ("example.test",))
