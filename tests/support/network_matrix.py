"""The cross product of the network parameters, NIC sets, network-config versions and seed
deliveries, as Ganeti environments; and what each combination must give the guest.

The NIC sets are written as the variables Ganeti 3.0 hands an OS script (``NIC_N_*`` and, on a
Ganeti network, ``NIC_N_NETWORK_*``; the communication NIC is the last one, named
``ganeti:communication:<instance>``, in routed mode on 169.254.0.0/16 with MAC prefix 52:54:00)
and go through the provider's own environment parser.  What each must give the guest is written
out by hand per NIC set, not derived from the code under test.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from instance_cloudimage.ganeti.simulate import simulated_core_environment

INSTANCE = "inst1.example.test"
NETWORK_MODES = ("auto", "dhcp", "none")
NAMESERVERS = {"none": "", "v4": "192.0.2.53", "v6": "2001:db8::53", "both": "192.0.2.53, 2001:db8::53 198.51.100.53"}
SEARCH = {"none": "", "one": "example.test", "several": "example.test corp.example.test lab.example.org"}
VERSIONS = (1, 2)
DELIVERIES = ("nocloud-dir", "cidata-disk", "config-2")
SEED_PARAMETER = {"nocloud-dir": "nocloud-fs", "cidata-disk": "nocloud-disk", "config-2": "configdrive-disk"}
COMM_MAC = "52:54:00:1a:2b:3c"


def _mac(i: int) -> str:
    return f"aa:00:00:00:00:{i + 1:02x}"


def _bridged(i: int) -> dict[str, str]:
    return {f"NIC_{i}_MAC": _mac(i), f"NIC_{i}_UUID": f"00000000-0000-4000-8000-00000000000{i}",
            f"NIC_{i}_MODE": "bridged", f"NIC_{i}_LINK": "br0", f"NIC_{i}_BRIDGE": "br0",
            f"NIC_{i}_FRONTEND_TYPE": "paravirtual"}


def _network(i: int, name: str, **values: str) -> dict[str, str]:
    env = {f"NIC_{i}_NETWORK_NAME": name, f"NIC_{i}_NETWORK_UUID": f"11111111-0000-4000-8000-00000000000{i}",
           f"NIC_{i}_NETWORK_TAGS": ""}
    return env | {f"NIC_{i}_NETWORK_{k.upper()}": v for k, v in values.items()}


def _comm(i: int) -> dict[str, str]:
    return {f"NIC_{i}_MAC": COMM_MAC, f"NIC_{i}_UUID": "22222222-0000-4000-8000-000000000000",
            f"NIC_{i}_MODE": "routed", f"NIC_{i}_LINK": "communication_rt", f"NIC_{i}_IP": "169.254.12.34",
            f"NIC_{i}_NAME": f"ganeti:communication:{INSTANCE}", f"NIC_{i}_FRONTEND_TYPE": "paravirtual",
            **_network(i, "gnt-com", subnet="169.254.0.0/16", subnet6="fe80::/10", mac_prefix="52:54:00")}


PUB = {"subnet": "192.0.2.0/24", "gateway": "192.0.2.1"}
DUAL = {"subnet": "198.51.100.0/24", "gateway": "198.51.100.1", "subnet6": "2001:db8:1::/64",
        "gateway6": "2001:db8:1::1"}
V6ONLY = {"subnet6": "2001:db8:2::/64", "gateway6": "2001:db8:2::1"}
PRIVATE = {"subnet": "10.20.0.0/24"}  # no gateway: a back-end network
# The EUI-64 addresses of _mac(0) and _mac(1) in 2001:db8:1::/64 (RFC 4291 appendix A, by hand).
EUI_0 = "2001:db8:1:0:a800:ff:fe00:1/64"
EUI_1 = "2001:db8:1:0:a800:ff:fe00:2/64"


@dataclass(frozen=True)
class NicWant:
    """What one guest interface must get with network=auto."""

    name: str
    mac: str
    dhcp4: bool = False
    v4: str | None = None  # address/prefix
    v6: str | None = None
    gateway4: str | None = None  # the default route, on this NIC only
    gateway6: str | None = None
    dns: bool = False  # the DNS parameters go here
    secondary_dhcp: bool = False  # DHCP whose routes must not win (high metric, no routes)
    communication: bool = False


@dataclass(frozen=True)
class NicSet:
    name: str
    env: Mapping[str, str]
    auto: tuple[NicWant, ...]

    def want(self, mode: str) -> tuple[NicWant, ...]:
        """network=dhcp: DHCP everywhere, Ganeti's addresses ignored, the first NIC's routes and DNS."""
        if mode != "dhcp":
            return self.auto
        regular = [w for w in self.auto if not w.communication]
        first = regular[0].name if regular else None
        return tuple(NicWant(w.name, w.mac, dhcp4=True, dns=w.name == first, communication=w.communication,
                             secondary_dhcp=w.name != first and not w.communication) for w in self.auto)


NIC_SETS = (
    NicSet("no-nic", {}, ()),
    NicSet("one-dhcp", _bridged(0), (NicWant("eth0", _mac(0), dhcp4=True, dns=True),)),
    NicSet("static-v4", _bridged(0) | {"NIC_0_IP": "192.0.2.10"} | _network(0, "pub", **PUB),
           (NicWant("eth0", _mac(0), v4="192.0.2.10/24", gateway4="192.0.2.1", dns=True),)),
    NicSet("static-v6", _bridged(0) | {"NIC_0_IP": "2001:db8:2::42"} | _network(0, "v6", **V6ONLY),
           (NicWant("eth0", _mac(0), v6="2001:db8:2::42/64", gateway6="2001:db8:2::1", dns=True),)),
    NicSet("dual-stack", _bridged(0) | {"NIC_0_IP": "198.51.100.7"} | _network(0, "dual", **DUAL),
           (NicWant("eth0", _mac(0), v4="198.51.100.7/24", v6=EUI_0, gateway4="198.51.100.1",
                    gateway6="2001:db8:1::1", dns=True),)),
    NicSet("three-nics", _bridged(0) | {"NIC_0_IP": "10.20.0.5"} | _network(0, "back", **PRIVATE)
           | _bridged(1) | {"NIC_1_IP": "192.0.2.11"} | _network(1, "pub", **PUB) | _bridged(2),
           (NicWant("eth0", _mac(0), v4="10.20.0.5/24"),
            NicWant("eth1", _mac(1), v4="192.0.2.11/24", gateway4="192.0.2.1", dns=True),
            NicWant("eth2", _mac(2), dhcp4=True, secondary_dhcp=True))),
    NicSet("communication-alone", _comm(0), (NicWant("eth0", COMM_MAC, dhcp4=True, communication=True),)),
    NicSet("communication-and-others", _bridged(0) | _bridged(1) | {"NIC_1_IP": "198.51.100.8"}
           | _network(1, "dual", **DUAL) | _comm(2),
           (NicWant("eth0", _mac(0), dhcp4=True, secondary_dhcp=True),
            NicWant("eth1", _mac(1), v4="198.51.100.8/24", v6=EUI_1, gateway4="198.51.100.1",
                    gateway6="2001:db8:1::1", dns=True),
            NicWant("eth2", COMM_MAC, dhcp4=True, communication=True))),
)


@dataclass(frozen=True)
class Combination:
    network: str
    nameservers: str  # key of NAMESERVERS
    search: str  # key of SEARCH
    nics: NicSet
    version: int
    delivery: str

    @property
    def id(self) -> str:
        return (f"network={self.network},dns_nameservers={self.nameservers},dns_search={self.search},"
                f"nics={self.nics.name},v{self.version},{self.delivery}")

    @property
    def params(self) -> dict[str, str]:
        out = {"network": self.network, "seed": SEED_PARAMETER[self.delivery]}
        if NAMESERVERS[self.nameservers]:
            out["dns_nameservers"] = NAMESERVERS[self.nameservers]
        if SEARCH[self.search]:
            out["dns_search"] = SEARCH[self.search]
        return out

    @property
    def want_nameservers(self) -> tuple[str, ...]:
        return tuple(NAMESERVERS[self.nameservers].replace(",", " ").split())

    @property
    def want_search(self) -> tuple[str, ...]:
        return tuple(SEARCH[self.search].split())

    def environment(self) -> dict[str, str]:
        nic_count = len({k.split("_")[1] for k in self.nics.env})
        return simulated_core_environment(f"net-v{self.version}", params=self.params) | dict(self.nics.env) | {
            "INSTANCE_NAME": INSTANCE, "INSTANCE_UUID": "68c41cfd-8b97-4cda-8ba0-674afdb4b6bd",
            "INSTANCE_OS": f"cloudimage+net-v{self.version}", "HYPERVISOR": "kvm", "DISK_COUNT": "0",
            "NIC_COUNT": str(nic_count)}


def combinations() -> Iterator[Combination]:
    for network, ns, search, nics, version, delivery in itertools.product(
            NETWORK_MODES, NAMESERVERS, SEARCH, NIC_SETS, VERSIONS, DELIVERIES):
        yield Combination(network, ns, search, nics, version, delivery)
