"""Reading what cloud-init's renderers wrote, and comparing it with what a NIC set must get.

One reader per renderer output (ifupdown's interfaces file, RHEL's ifcfg files and resolv.conf,
NetworkManager keyfiles, the systemd-networkd files netplan generates) turns the files into one
shape per interface; ``check_interfaces`` then compares that with the hand-written
``NicWant``s.  Each check returns the problems it found as short strings, so that one run of the
matrix lists every combination that is wrong and why.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tests.support.network_matrix import NicWant

SECONDARY = 1000  # the lowest route metric a DHCP NIC that must not win may have


@dataclass
class Seen:
    """What one renderer configured on one interface."""

    mac: str | None = None
    dhcp4: bool = False
    addresses: set[str] = field(default_factory=set)  # normalised address/prefix
    gateways4: set[str] = field(default_factory=set)
    gateways6: set[str] = field(default_factory=set)
    nameservers: set[str] = field(default_factory=set)
    search: set[str] = field(default_factory=set)
    metric: int | None = None
    dhcp_routes: bool = True  # False: told to ignore the routes DHCP offers
    dhcp_dns: bool = True


@dataclass
class Rendered:
    interfaces: dict[str, Seen]
    global_nameservers: set[str] = field(default_factory=set)  # where the renderer has a global place
    global_search: set[str] = field(default_factory=set)
    can_drop_dhcp_routes: bool = False
    has_metric: bool = True


def _addr(value: str) -> str:
    return str(ipaddress.ip_interface(value.strip()))


def _ip(value: str) -> str:
    return str(ipaddress.ip_address(value.strip()))


def _words(value: str) -> list[str]:
    return [w for w in re.split(r"[\s,;]+", value) if w]


def read_eni(files: Mapping[str, str]) -> Rendered:
    text = files["etc/network/interfaces.d/50-cloud-init"]
    seen: dict[str, Seen] = {}
    lo = Seen()
    current: Seen | None = None
    family = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if raw.startswith("iface "):
            _, name, family, method = line.split()
            current = lo if name == "lo" else seen.setdefault(name, Seen())
            current.dhcp4 |= family == "inet" and method == "dhcp"
            continue
        if raw.startswith(("auto ", "allow-")):
            continue
        assert current is not None, line
        key, _, value = line.partition(" ")
        if key == "address":
            current.addresses.add(_addr(value))
        elif key == "gateway":
            (current.gateways6 if family == "inet6" else current.gateways4).add(_ip(value))
        elif key == "dns-nameservers":
            current.nameservers |= {_ip(v) for v in _words(value)}
        elif key == "dns-search":
            current.search |= set(_words(value))
        elif key == "metric":
            current.metric = int(value)
    for name, mac in _udev_names(files.get("etc/udev/rules.d/70-persistent-net.rules", "")).items():
        seen.setdefault(name, Seen()).mac = mac
    return Rendered(seen, lo.nameservers, lo.search)


def _udev_names(text: str) -> dict[str, str]:
    return {m[1]: m[0].lower() for m in re.findall(r'ATTR\{address\}=="([^"]+)", NAME="([^"]+)"', text)}


def _shell_vars(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip().strip("\"'")
    return out


def read_sysconfig(files: Mapping[str, str]) -> Rendered:
    seen: dict[str, Seen] = {}
    for path, text in files.items():
        m = re.fullmatch(r"etc/sysconfig/network-scripts/ifcfg-(.+)", path)
        if not m:
            continue
        v = _shell_vars(text)
        s = seen.setdefault(m[1], Seen(mac=v.get("HWADDR", "").lower() or None))
        s.dhcp4 = v.get("BOOTPROTO") == "dhcp"
        for k, val in v.items():
            if re.fullmatch(r"IPADDR\d*", k):
                suffix = k[len("IPADDR"):]
                prefix = v.get("PREFIX" + suffix) or str(ipaddress.ip_network(f"0.0.0.0/{v['NETMASK' + suffix]}")
                                                         .prefixlen)
                s.addresses.add(_addr(f"{val}/{prefix}"))
            elif k in ("IPV6ADDR", "IPV6ADDR_SECONDARIES"):
                s.addresses |= {_addr(a) for a in val.split()}
            elif re.fullmatch(r"DNS\d+", k):
                s.nameservers.add(_ip(val))
        if v.get("GATEWAY"):
            s.gateways4.add(_ip(v["GATEWAY"]))
        if v.get("IPV6_DEFAULTGW"):
            s.gateways6.add(_ip(v["IPV6_DEFAULTGW"].split("%")[0]))
        s.search |= set(_words(v.get("DOMAIN", "")))
        if v.get("METRIC"):
            s.metric = int(v["METRIC"])
    resolv = files.get("etc/resolv.conf", "")
    ns = {_ip(line.split()[1]) for line in resolv.splitlines() if line.startswith("nameserver ")}
    search = {w for line in resolv.splitlines() if line.startswith("search ") for w in line.split()[1:]}
    return Rendered(seen, ns, search)


def _keyfile(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def read_networkmanager(files: Mapping[str, str]) -> Rendered:
    seen: dict[str, Seen] = {}
    for path, text in files.items():
        m = re.fullmatch(r"etc/NetworkManager/system-connections/cloud-init-(.+)\.nmconnection", path)
        if not m:
            continue
        kf = _keyfile(text)
        s = seen.setdefault(m[1], Seen(mac=kf.get("ethernet", "mac-address", fallback="").lower() or None))
        for family in ("ipv4", "ipv6"):
            if not kf.has_section(family):
                continue
            sec = kf[family]
            if family == "ipv4" and sec.get("method") == "auto":
                s.dhcp4 = True
            s.addresses |= {_addr(val) for key, val in sec.items() if re.fullmatch(r"address\d+", key)}
            if sec.get("gateway"):
                (s.gateways6 if family == "ipv6" else s.gateways4).add(_ip(sec["gateway"]))
            s.nameservers |= {_ip(w) for w in _words(sec.get("dns", ""))}
            s.search |= set(_words(sec.get("dns-search", "")))
    return Rendered(seen, has_metric=False)


def _unit(text: str) -> dict[str, list[str]]:
    """A systemd unit's key=value lines as "Section.Key" → values (keys repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(f"{section}.{k}", []).append(v)
    return out


def read_netplan(files: Mapping[str, str]) -> Rendered:
    seen: dict[str, Seen] = {}
    for path, text in files.items():
        m = re.fullmatch(r"run/systemd/network/10-netplan-(.+)\.(network|link)", path)
        if not m:
            continue
        u = _unit(text)
        s = seen.setdefault(m[1], Seen())
        if m[2] == "link":
            if u.get("Link.Name") != [m[1]]:
                continue  # no rename: the interface keeps its kernel name
            s.mac = (u.get("Match.PermanentMACAddress") or u.get("Match.MACAddress") or [""])[0].lower() or None
            continue
        s.dhcp4 = any(v in ("ipv4", "yes", "true") for v in u.get("Network.DHCP", []))
        s.addresses |= {_addr(a) for a in u.get("Network.Address", [])}
        for g in u.get("Network.Gateway", []) + u.get("Route.Gateway", []):
            (s.gateways6 if ":" in g else s.gateways4).add(_ip(g))
        s.nameservers |= {_ip(w) for v in u.get("Network.DNS", []) for w in v.split()}
        s.search |= {w for v in u.get("Network.Domains", []) for w in v.split()}
        metric = u.get("DHCP.RouteMetric") or u.get("DHCPv4.RouteMetric")
        s.metric = int(metric[0]) if metric else None
        s.dhcp_routes = (u.get("DHCP.UseRoutes") or u.get("DHCPv4.UseRoutes") or ["true"])[0] != "false"
        s.dhcp_dns = (u.get("DHCP.UseDNS") or u.get("DHCPv4.UseDNS") or ["true"])[0] != "false"
    return Rendered(seen, can_drop_dhcp_routes=True)


READERS = {"eni": read_eni, "sysconfig": read_sysconfig, "networkmanager": read_networkmanager,
           "netplan": read_netplan}


# What cloud-init 22.4's renderers cannot do, by renderer and by the form the configuration
# reaches them in ("v2": a NoCloud v2 document; "v1": a v1 document or network_data.json, which
# cloud-init converts to v1).  docs/seeding.md (Network) lists the same.
#   metric: a route metric for a DHCP NIC.  dhcp-dns: DNS on a NIC that has no static address.
LIMITS = {
    ("networkmanager", "v1"): {"metric"},  # the NM renderer writes no route-metric at all
    ("networkmanager", "v2"): {"metric", "dhcp-dns"},  # v2 DNS reaches only static subnets
    ("netplan", "v1"): {"metric", "dhcp-dns"},  # netplan's v1 conversion drops both
}


def check_interfaces(r: Rendered, want: Sequence[NicWant], nameservers: Sequence[str], search: Sequence[str],
                     *, drop_routes: bool, limits: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """What ``r`` gets wrong; ``drop_routes``: the seed's format can tell DHCP to ignore routes;
    ``limits``: what the renderer cannot do (LIMITS), which is then not asked of it."""
    if "metric" in limits:
        r.has_metric = False
    problems = []
    if set(r.interfaces) != {w.name for w in want}:
        problems.append(f"interfaces {sorted(r.interfaces)}, want {[w.name for w in want]}")
        return problems
    want_ns, want_search = {_ip(n) for n in nameservers}, set(search)
    dns_nic = next((w.name for w in want if w.dns), None)
    for w in want:
        s = r.interfaces[w.name]
        if s.mac != w.mac:
            problems.append(f"{w.name}: MAC {s.mac}, want {w.mac}")
        if s.dhcp4 != w.dhcp4:
            problems.append(f"{w.name}: dhcp4 {s.dhcp4}, want {w.dhcp4}")
        addresses = {_addr(a) for a in (w.v4, w.v6) if a}
        if s.addresses != addresses:
            problems.append(f"{w.name}: addresses {sorted(s.addresses)}, want {sorted(addresses)}")
        for got, gw, what in ((s.gateways4, w.gateway4, "IPv4"), (s.gateways6, w.gateway6, "IPv6")):
            if got != ({_ip(gw)} if gw else set()):
                problems.append(f"{w.name}: {what} gateways {sorted(got)}, want {gw or 'none'}")
        if w.secondary_dhcp or w.communication:
            if r.has_metric and (s.metric is None or s.metric < SECONDARY):
                problems.append(f"{w.name}: DHCP route metric {s.metric}, want >= {SECONDARY}")
            if r.can_drop_dhcp_routes and drop_routes and s.dhcp_routes:
                problems.append(f"{w.name}: keeps the routes DHCP offers")
        if w.communication and r.can_drop_dhcp_routes and drop_routes and s.dhcp_dns:
            problems.append(f"{w.name}: takes DNS from Ganeti's dnsmasq")
        own_ns, own_search = s.nameservers, s.search
        if w.name == dns_nic and "dhcp-dns" in limits and not (w.v4 or w.v6):
            if own_ns or own_search:
                problems.append(f"{w.name}: DNS {sorted(own_ns | own_search)} where {sorted(LIMITS)} say none")
        elif w.name == dns_nic:
            # A renderer's global place (ENI's lo stanza, RHEL's resolv.conf) serves the DNS NIC too.
            own_ns, own_search = own_ns | r.global_nameservers, own_search | r.global_search
            if own_ns != want_ns:
                problems.append(f"{w.name}: nameservers {sorted(own_ns)}, want {sorted(want_ns)}")
            if own_search != want_search:
                problems.append(f"{w.name}: search {sorted(own_search)}, want {sorted(want_search)}")
        elif own_ns or own_search:
            problems.append(f"{w.name}: DNS {sorted(own_ns | own_search)}, want none")
    if dns_nic is None and (r.global_nameservers or r.global_search):
        problems.append("global DNS without a NIC to reach it")
    return problems
