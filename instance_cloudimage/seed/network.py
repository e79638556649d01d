"""Network configuration for the guest, from Ganeti's NIC_* and NIC_N_NETWORK_* variables.

First a plan (which NIC gets which addresses, gateways and DNS), then three renderings of it:
cloud-init network-config v2 and v1 (NoCloud) and OpenStack ``network_data.json`` (config
drive).  The rules, also in docs/seeding.md ("Network"):

* Every NIC is matched by MAC and gets a fixed name, ``eth<N>`` for Ganeti NIC N, always through
  ``set-name`` (cloud-init LP#1979877: a MAC match without set-name leaves NICs unconfigured).
* IPv4: static ``NIC_IP/prefix`` when Ganeti gave an IP inside the NIC's network subnet, DHCP
  otherwise (not on a network that only has an IPv6 subnet).
* IPv6: static ``NIC_IP/prefix`` when the NIC's IP is IPv6 inside NETWORK_SUBNET6; otherwise,
  when the network has a SUBNET6 of /64 or wider, the EUI-64 address of the NIC's MAC in it (the
  address SLAAC would pick, so it also works where nothing sends router advertisements).
* One default route per family: IPv4 through the gateway of the first NIC with a static address
  and a gateway, else the first DHCP NIC's; IPv6 through the first NIC with a gateway6.  Other
  DHCP NICs are told not to install DHCP routes (v2 ``use-routes: false``) and get a high route
  metric for renderers that cannot drop them (v1, ENI).  A NIC with a static IPv6 default
  route ignores router advertisements, which would add a second one.
* Gateways are written as the address's gateway (v2 ``gateway4``/``gateway6``, v1/config-drive
  subnet ``gateway``), never as a route: Debian's ENI renderer turns routes into
  ``post-up route add ... || true`` lines that vanish when net-tools is absent.
* Ganeti's instance-communication NIC (``ganeti:communication:*``) uses DHCP without routes or
  DNS (Ganeti's dnsmasq offers itself as router) and is optional at boot; metad at
  169.254.169.254 is on-link there.
* DNS servers and search domains from the OS parameters go on the default-route NIC, on its
  first subnet in v1 and network_data.json; when that NIC has no static address, also in the
  global form (v1 nameserver entry, Nova dns services), the only one sysconfig reads for it.
  Search domains need a server (``check_dns_parameters``, shared by verify and create).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from instance_cloudimage.ganeti.env import Nic
from instance_cloudimage.runtime.errors import ParameterError

log = logging.getLogger(__name__)

SECONDARY_METRIC = 1000  # + NIC index, for DHCP routes we could not suppress
COMMUNICATION_METRIC = 10000
NETWORK_MODES = ("auto", "dhcp", "none")

IPv4If = ipaddress.IPv4Interface
IPv6If = ipaddress.IPv6Interface


@dataclass(frozen=True)
class NicPlan:
    index: int
    name: str
    mac: str
    communication: bool = False
    dhcp4: bool = False
    address4: IPv4If | None = None
    address6: IPv6If | None = None
    gateway4: ipaddress.IPv4Address | None = None  # set only on the NIC carrying the default route
    gateway6: ipaddress.IPv6Address | None = None
    default_route4: bool = False  # this NIC's DHCP routes are the ones to keep
    dns: bool = False

    @property
    def route_metric(self) -> int | None:
        if self.communication:
            return COMMUNICATION_METRIC
        if self.dhcp4 and not self.default_route4:
            return SECONDARY_METRIC + self.index
        return None


@dataclass(frozen=True)
class NetworkPlan:
    nics: tuple[NicPlan, ...]
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()


def interface_name(nic: Nic) -> str:
    return f"eth{nic.index}"


def eui64_address(mac: str, subnet: ipaddress.IPv6Network) -> ipaddress.IPv6Address:
    """RFC 4291 appendix A: flip the U/L bit, put ff:fe in the middle."""
    octets = bytearray(int(x, 16) for x in mac.split(":"))
    octets[0] ^= 0x02
    iid = bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:])
    return ipaddress.IPv6Address(int(subnet.network_address) | int.from_bytes(iid, "big"))


def _static4(nic: Nic) -> tuple[IPv4If | None, ipaddress.IPv4Address | None]:
    net = nic.network
    if not isinstance(nic.ip, ipaddress.IPv4Address):
        return None, None
    if net is None or net.subnet is None:
        log.info("NIC %d has IP %s but no Ganeti network with a subnet: using DHCP", nic.index, nic.ip)
        return None, None
    if nic.ip not in net.subnet:
        log.warning("NIC %d: IP %s is outside its network's subnet %s: using DHCP", nic.index, nic.ip, net.subnet)
        return None, None
    gateway = net.gateway if net.gateway is not None and net.gateway in net.subnet else None
    if net.gateway is not None and gateway is None:
        log.warning("NIC %d: gateway %s is outside subnet %s: not used", nic.index, net.gateway, net.subnet)
    return IPv4If(f"{nic.ip}/{net.subnet.prefixlen}"), gateway


def _static6(nic: Nic) -> tuple[IPv6If | None, ipaddress.IPv6Address | None]:
    net = nic.network
    if net is None or net.subnet6 is None:
        return None, None
    if isinstance(nic.ip, ipaddress.IPv6Address) and nic.ip in net.subnet6:
        address = nic.ip
    elif net.subnet6.prefixlen <= 64:
        address = eui64_address(nic.mac, net.subnet6)
    else:
        return None, None
    return IPv6If(f"{address}/{net.subnet6.prefixlen}"), net.gateway6


def _plan_nic(nic: Nic, mode: str) -> NicPlan:
    base = NicPlan(index=nic.index, name=interface_name(nic), mac=nic.mac)
    if nic.is_communication or mode == "dhcp":
        return replace(base, communication=nic.is_communication, dhcp4=True)
    address4, gateway4 = _static4(nic)
    address6, gateway6 = _static6(nic)
    v6_only = nic.network is not None and nic.network.subnet is None and nic.network.subnet6 is not None
    return replace(base, address4=address4, gateway4=gateway4, address6=address6, gateway6=gateway6,
                   dhcp4=address4 is None and not v6_only)


def check_dns_parameters(mode: str, nameservers: Sequence[str], search: Sequence[str]) -> None:
    """The rule verify and create share: search domains need a name server.  cloud-init 22.4
    rejects a v2 ``nameservers`` entry without addresses (network_state raises, and the guest
    drops the entry with a warning), takes a global v1 one only with an address, and sysconfig
    and netplan drop search domains a DHCP NIC's subnet carries.  Raises ParameterError."""
    if mode != "none" and search and not nameservers:
        raise ParameterError("dns_search needs dns_nameservers: cloud-init rejects search domains "
                             "given without a name server", "add dns_nameservers, or leave dns_search out")


def plan_network(nics: Sequence[Nic], mode: str, nameservers: Sequence[str] = (),
                 search: Sequence[str] = ()) -> NetworkPlan | None:
    """The plan for ``mode`` (auto, dhcp, none); None when nothing is to be written."""
    if mode == "none" or not nics:
        return None
    if mode not in NETWORK_MODES:
        raise ValueError(f"unknown network mode {mode!r}")
    planned = [_plan_nic(n, mode) for n in nics]
    regular = [p for p in planned if not p.communication]
    static_gw = [p for p in regular if p.gateway4 is not None]
    primary4 = static_gw[0] if static_gw else next((p for p in regular if p.dhcp4), None)
    primary6 = next((p for p in regular if p.gateway6 is not None), None)
    dns_nic = primary4 or (regular[0] if regular else None)
    if dns_nic is None and (nameservers or search):
        log.warning("dns_nameservers/dns_search are not used: the instance's only NIC is the communication NIC")
    nameservers, search = _reachable_dns(dns_nic, nameservers, search)
    out = []
    for p in planned:
        is4, is6 = p is primary4, p is primary6
        out.append(replace(p, gateway4=p.gateway4 if is4 else None, gateway6=p.gateway6 if is6 else None,
                           default_route4=is4 and p.dhcp4, dns=p is dns_nic and bool(nameservers or search)))
    return NetworkPlan(tuple(out), tuple(nameservers), tuple(search))


def _reachable_dns(nic: NicPlan | None, nameservers: Sequence[str],
                   search: Sequence[str]) -> tuple[Sequence[str], Sequence[str]]:
    """The servers of the families ``nic`` is configured for (IPv4: DHCP or a static address;
    IPv6: a static address).  NetworkManager refuses a whole connection whose ipv4 or ipv6
    section lists DNS with method=disabled, which is what cloud-init 22.4 writes for a server of
    the other family; nor could the NIC reach it.  Without any server left, the search domains
    go too (cloud-init rejects them alone: check_dns_parameters)."""
    if nic is None:
        return (), ()
    families = {4} if nic.dhcp4 or nic.address4 is not None else set()
    families |= {6} if nic.address6 is not None else set()
    kept = [a for a in nameservers if ipaddress.ip_address(a).version in families]
    if len(kept) < len(nameservers):
        dropped = [str(i) for i, a in enumerate(nameservers, 1) if a not in kept]
        log.warning("dns_nameservers entries %s are not used: %s has no address of their IP version",
                    ", ".join(dropped), nic.name)
    if not kept and search:
        log.warning("dns_search is not used: no server in dns_nameservers is reachable over %s", nic.name)
        return (), ()
    return kept, search


# --- renderings --------------------------------------------------------------------------------

def render_v2(plan: NetworkPlan) -> dict[str, Any]:
    ethernets: dict[str, Any] = {}
    for p in plan.nics:
        eth: dict[str, Any] = {"match": {"macaddress": p.mac}, "set-name": p.name, "dhcp4": p.dhcp4}
        addresses = [str(a) for a in (p.address4, p.address6) if a is not None]
        if addresses:
            eth["addresses"] = addresses
        if p.gateway4 is not None:
            eth["gateway4"] = str(p.gateway4)
        if p.gateway6 is not None:
            eth["gateway6"] = str(p.gateway6)
            eth["accept-ra"] = False
        if p.dns:
            ns: dict[str, Any] = {}
            if plan.nameservers:
                ns["addresses"] = list(plan.nameservers)
            if plan.search:
                ns["search"] = list(plan.search)
            eth["nameservers"] = ns
        if p.dhcp4 and p.route_metric is not None:
            overrides: dict[str, Any] = {"use-routes": False, "route-metric": p.route_metric}
            if p.communication:
                overrides["use-dns"] = False
            eth["dhcp4-overrides"] = overrides
        if p.communication:
            eth["optional"] = True
        ethernets[p.name] = eth
    return {"version": 2, "ethernets": ethernets}


def render_v1(plan: NetworkPlan) -> dict[str, Any]:
    config: list[dict[str, Any]] = []
    for p in plan.nics:
        subnets: list[dict[str, Any]] = []
        if p.dhcp4:
            dhcp: dict[str, Any] = {"type": "dhcp4"}
            if p.route_metric is not None:
                dhcp["metric"] = p.route_metric
            subnets.append(dhcp)
        for addr, gw, kind in ((p.address4, p.gateway4, "static"), (p.address6, p.gateway6, "static6")):
            if addr is None:
                continue
            static: dict[str, Any] = {"type": kind, "address": str(addr)}
            if gw is not None:
                static["gateway"] = str(gw)
            subnets.append(static)
        if p.dns and subnets:
            # On the subnet rather than only a global nameserver entry, which networkd would put
            # on every link, the communication NIC's included, and NetworkManager ignores.
            subnets[0].update(_dns_keys(plan))
        phy: dict[str, Any] = {"type": "physical", "name": p.name, "mac_address": p.mac, "subnets": subnets}
        if p.gateway6 is not None:
            phy["accept-ra"] = False
        config.append(phy)
    if _dns_on_dhcp_only(plan):
        # sysconfig and netplan take DNS from a static subnet only; for a DHCP NIC sysconfig
        # writes the global entry into resolv.conf (and ENI onto lo, beside the subnet's lines).
        config.append({"type": "nameserver", "address": list(plan.nameservers), **_search_key(plan)})
    return {"version": 1, "config": config}


def _search_key(plan: NetworkPlan) -> dict[str, Any]:
    return {"search": list(plan.search)} if plan.search else {}


def _dns_keys(plan: NetworkPlan) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    if plan.nameservers:
        keys["dns_nameservers"] = list(plan.nameservers)
    if plan.search:
        keys["dns_search"] = list(plan.search)
    return keys


def _dns_on_dhcp_only(plan: NetworkPlan) -> bool:
    """The DNS NIC has no static address, so a renderer that reads DNS only from static
    subnets needs the global form too (cloud-init 22.4 accepts that form only with a server)."""
    return bool(plan.nameservers) and any(p.dns and p.address4 is None and p.address6 is None for p in plan.nics)


def render_network_data(plan: NetworkPlan) -> dict[str, Any]:
    """OpenStack network_data.json, with the two keys cloud-init honours beyond Nova's:
    a link ``name`` (the guest interface name, so no lookup by MAC is needed) and a network
    ``gateway`` (rendered natively, where Nova's default ``routes`` entry is not on ENI)."""
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    for p in plan.nics:
        links.append({"id": p.name, "name": p.name, "type": "phy", "ethernet_mac_address": p.mac})
        entries: list[dict[str, Any]] = []
        if p.dhcp4:
            dhcp: dict[str, Any] = {"type": "ipv4_dhcp"}
            if p.route_metric is not None:
                dhcp["metric"] = p.route_metric
            entries.append(dhcp)
        for addr, gw, kind in ((p.address4, p.gateway4, "ipv4"), (p.address6, p.gateway6, "ipv6")):
            if addr is None:
                continue
            entry: dict[str, Any] = {"type": kind, "ip_address": str(addr.ip), "netmask": str(addr.netmask)}
            if gw is not None:
                entry["gateway"] = str(gw)
            entries.append(entry)
        if p.dns and entries:
            # On the network (cloud-init takes both keys into its subnet), so that they reach
            # this NIC only; Nova's dns services, below, are global.
            entries[0].update(_dns_keys(plan))
        for entry in entries:
            networks.append({"id": f"network{len(networks)}", "link": p.name, **entry})
    services: list[dict[str, Any]] = []
    if _dns_on_dhcp_only(plan):
        services = [{"type": "dns", "address": a} for a in plan.nameservers]
        services[0].update(_search_key(plan))  # cloud-init passes a service's keys on as they are
    return {"links": links, "networks": networks, "services": services}
