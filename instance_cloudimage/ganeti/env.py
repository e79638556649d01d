"""The Ganeti OS-interface environment, parsed once into frozen dataclasses.

Nothing else in the package reads ``os.environ``: the scripts call ``parse_environment()`` once
and pass the result down.  The contract is Ganeti 3.0's OS interface (ganeti-os-interface(7)).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from instance_cloudimage.ganeti.uri import redact_uri
from instance_cloudimage.runtime.errors import EnvironmentError_

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
SUPPORTED_API_VERSIONS = (20,)
# Ganeti joins the OS name and the variant with '+'.
OS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Script(StrEnum):
    CREATE = "create"
    IMPORT = "import"
    EXPORT = "export"
    RENAME = "rename"
    VERIFY = "verify"


@dataclass(frozen=True)
class Disk:
    index: int
    path: str | None
    uri: str | None
    size_mib: int | None
    access: str
    backend_type: str | None
    uuid: str | None
    name: str | None = None

    @property
    def size_bytes(self) -> int | None:
        return None if self.size_mib is None else self.size_mib * 1024 * 1024

    @property
    def is_file(self) -> bool:
        """A regular file (Ganeti's file/sharedfile templates) rather than a block device."""
        if self.backend_type is not None and self.backend_type.startswith("file"):
            return True
        return self.path is not None and os.path.isfile(self.path)

    def describe(self) -> str:
        return f"disk {self.index} ({self.path or redact_uri(self.uri or '')})"


@dataclass(frozen=True)
class Network:
    name: str
    uuid: str | None = None
    subnet: ipaddress.IPv4Network | None = None
    gateway: ipaddress.IPv4Address | None = None
    subnet6: ipaddress.IPv6Network | None = None
    gateway6: ipaddress.IPv6Address | None = None
    mac_prefix: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Nic:
    index: int
    mac: str
    mode: str | None = None
    link: str | None = None
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    name: str | None = None
    uuid: str | None = None
    bridge: str | None = None
    network: Network | None = None

    @property
    def is_communication(self) -> bool:
        """Ganeti's instance-communication NIC, over which metad is reached."""
        return bool(self.name and self.name.startswith("ganeti:communication:"))


@dataclass(frozen=True)
class Instance:
    name: str
    uuid: str | None
    os: str | None
    hypervisor: str | None
    primary_node: str | None
    secondary_nodes: tuple[str, ...]
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...]
    reinstall: bool = False
    be: Mapping[str, str] = field(default_factory=dict)
    hv: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportExport:
    """import/export extras: which disk, where, and the size side channel."""

    index: int
    device: str | None
    uri: str | None
    size_fd: int | None


@dataclass(frozen=True)
class GanetiEnv:
    api_version: int
    os_name: str
    variant: str
    debug_level: int
    params: Mapping[str, str]
    instance: Instance | None = None
    old_instance_name: str | None = None
    transfer: ImportExport | None = None

    def uris(self) -> list[str]:
        """Every disk URI Ganeti passed (they may carry credentials: see uridisk.uri_secrets)."""
        found = [d.uri for d in (self.instance.disks if self.instance else ()) if d.uri]
        if self.transfer is not None and self.transfer.uri:
            found.append(self.transfer.uri)
        return found

    def require_instance(self) -> Instance:
        if self.instance is None:
            raise EnvironmentError_("INSTANCE_NAME must be set: this script needs an instance")
        return self.instance


class _Reader:
    """Typed access to the environment mapping with uniform error messages."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def optional(self, name: str) -> str | None:
        value = self.env.get(name)
        return value if value not in (None, "") else None

    def required(self, name: str) -> str:
        value = self.optional(name)
        if value is None:
            raise EnvironmentError_(f"${name} must be set", "is this script being run by Ganeti?")
        return value

    def integer(self, name: str, *, required: bool = True, minimum: int = 0) -> int | None:
        raw = self.required(name) if required else self.optional(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise EnvironmentError_(f"${name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise EnvironmentError_(f"${name} must be at least {minimum}, got {value}")
        return value

    def ip_network(self, name: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        raw = self.optional(name)
        if raw is None:
            return None
        try:
            net = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise EnvironmentError_(f"${name} is not an IP network: {raw!r}") from None
        if net.version != version:
            raise EnvironmentError_(f"${name} must be an IPv{version} network, got {raw!r}")
        return net

    def ip_address(self, name: str, version: int | None = None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        raw = self.optional(name)
        if raw is None:
            return None
        try:
            addr = ipaddress.ip_address(raw)
        except ValueError:
            raise EnvironmentError_(f"${name} is not an IP address: {raw!r}") from None
        if version is not None and addr.version != version:
            raise EnvironmentError_(f"${name} must be an IPv{version} address, got {raw!r}")
        return addr


def check_device_path(name: str, path: str) -> None:
    """``$name`` must be an absolute path to a block device or a regular file (file disks)."""
    if not os.path.isabs(path):
        raise EnvironmentError_(f"${name} must be an absolute path, got {path!r}")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise EnvironmentError_(f"${name} {path} is not accessible: {e.strerror}") from None
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise EnvironmentError_(f"${name} {path} is neither a block device nor a regular file")


def _parse_disk(r: _Reader, i: int) -> Disk:
    p = f"DISK_{i}_"
    path = r.optional(p + "PATH")
    uri = r.optional(p + "URI")
    if path is None and uri is None:
        raise EnvironmentError_(f"${p}PATH or ${p}URI must be set")
    if path is not None:
        check_device_path(p + "PATH", path)
    access = r.optional(p + "ACCESS") or "rw"
    if access not in ("rw", "ro"):
        raise EnvironmentError_(f"${p}ACCESS must be rw or ro, got {access!r}")
    return Disk(
        index=i,
        path=path,
        uri=uri,
        size_mib=r.integer(p + "SIZE", required=False, minimum=1),
        access=access,
        backend_type=r.optional(p + "BACKEND_TYPE"),
        uuid=r.optional(p + "UUID"),
        name=r.optional(p + "NAME"),
    )


def _parse_network(r: _Reader, p: str) -> Network | None:
    name = r.optional(p + "NETWORK_NAME")
    if name is None:
        return None
    subnet = r.ip_network(p + "NETWORK_SUBNET", 4)
    subnet6 = r.ip_network(p + "NETWORK_SUBNET6", 6)
    gateway = r.ip_address(p + "NETWORK_GATEWAY", 4)
    gateway6 = r.ip_address(p + "NETWORK_GATEWAY6", 6)
    tags = tuple((r.optional(p + "NETWORK_TAGS") or "").split())
    return Network(
        name=name,
        uuid=r.optional(p + "NETWORK_UUID"),
        subnet=subnet,  # type: ignore[arg-type]
        gateway=gateway,  # type: ignore[arg-type]
        subnet6=subnet6,  # type: ignore[arg-type]
        gateway6=gateway6,  # type: ignore[arg-type]
        mac_prefix=r.optional(p + "NETWORK_MAC_PREFIX"),
        tags=tags,
    )


def _parse_nic(r: _Reader, i: int) -> Nic:
    p = f"NIC_{i}_"
    mac = r.required(p + "MAC").lower()
    if not MAC_RE.match(mac):
        raise EnvironmentError_(f"${p}MAC is not a MAC address: {mac!r}")
    return Nic(
        index=i,
        mac=mac,
        mode=r.optional(p + "MODE"),
        link=r.optional(p + "LINK"),
        ip=r.ip_address(p + "IP"),
        name=r.optional(p + "NAME"),
        uuid=r.optional(p + "UUID"),
        bridge=r.optional(p + "BRIDGE"),
        network=_parse_network(r, p),
    )


def _prefixed(env: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: v for k, v in env.items() if k.startswith(prefix)}


def parse_os_params(env: Mapping[str, str]) -> dict[str, str]:
    """``OSP_FOO_BAR`` → ``foo_bar``.  Ganeti upper-cases names and turns '-' into '_'."""
    return {k.lower(): v for k, v in _prefixed(env, "OSP_").items()}


def _parse_instance(r: _Reader, env: Mapping[str, str]) -> Instance:
    disk_count = r.integer("DISK_COUNT")
    nic_count = r.integer("NIC_COUNT", required=False) or 0
    assert disk_count is not None
    return Instance(
        name=r.required("INSTANCE_NAME"),
        uuid=r.optional("INSTANCE_UUID"),
        os=r.optional("INSTANCE_OS"),
        hypervisor=r.optional("HYPERVISOR"),
        primary_node=r.optional("INSTANCE_PRIMARY_NODE"),
        secondary_nodes=tuple((r.optional("INSTANCE_SECONDARY_NODES") or "").split()),
        disks=tuple(_parse_disk(r, i) for i in range(disk_count)),
        nics=tuple(_parse_nic(r, i) for i in range(nic_count)),
        reinstall=r.optional("INSTANCE_REINSTALL") == "1",
        be=_prefixed(env, "INSTANCE_BE_"),
        hv=_prefixed(env, "INSTANCE_HV_"),
    )


def _parse_transfer(r: _Reader, script: Script) -> ImportExport | None:
    if script not in (Script.IMPORT, Script.EXPORT):
        return None
    word = script.name
    index = r.integer(f"{word}_INDEX")
    assert index is not None
    device_var = f"{word}_DEVICE" if r.optional(f"{word}_DEVICE") else f"{word}_DISK_PATH"
    device = r.optional(device_var)
    uri = r.optional(f"{word}_DISK_URI")
    if device is None and uri is None:
        raise EnvironmentError_(f"${word}_DEVICE or ${word}_DISK_URI must be set")
    if device is not None:
        check_device_path(device_var, device)
    return ImportExport(index=index, device=device, uri=uri,
                        size_fd=r.integer("EXP_SIZE_FD", required=False))


def parse_environment(env: Mapping[str, str], script: Script) -> GanetiEnv:
    """Parse what Ganeti passed to ``script``.  Raises EnvironmentError_ naming the variable."""
    r = _Reader(env)
    api = r.integer("OS_API_VERSION")
    assert api is not None
    if api not in SUPPORTED_API_VERSIONS:
        raise EnvironmentError_(f"$OS_API_VERSION {api} is not supported (this provider speaks 20)")
    os_name = r.required("OS_NAME")
    if not OS_NAME_RE.match(os_name):
        raise EnvironmentError_(f"$OS_NAME is malformed: {os_name!r}")
    variant = r.optional("OS_VARIANT") or ""
    debug = r.integer("DEBUG_LEVEL", required=False) or 0
    instance = None if script is Script.VERIFY else _parse_instance(r, env)
    return GanetiEnv(
        api_version=api,
        os_name=os_name,
        variant=variant,
        debug_level=debug,
        params=parse_os_params(env),
        instance=instance,
        old_instance_name=r.required("OLD_INSTANCE_NAME") if script is Script.RENAME else None,
        transfer=_parse_transfer(r, script),
    )


def debug_level_of(env: Mapping[str, str]) -> int:
    """DEBUG_LEVEL before full parsing, so that parse errors can show tracebacks too."""
    try:
        return int(env.get("DEBUG_LEVEL", "0") or 0)
    except ValueError:
        return 0
