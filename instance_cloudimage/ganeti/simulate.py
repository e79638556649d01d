"""A Ganeti-like environment for running the OS scripts outside Ganeti.

The one builder of what Ganeti 3.0 gives an OS script (the variables ``parse_environment``
reads), used by the console command's local ``create``, the benchmarks and the tests, so that
the three agree with each other and with the parser.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# What Ganeti's node daemon sets: a reset environment with this PATH.
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
API_VERSION = "20"


@dataclass(frozen=True)
class SimulatedDisk:
    path: str | os.PathLike[str]
    backend_type: str = "file:loop"
    size_mib: int | None = None
    access: str = "rw"


def simulated_mac(index: int) -> str:
    return f"aa:00:00:00:00:{index:02x}"


def simulated_environment(variant: str, disks: Sequence[SimulatedDisk | str | os.PathLike[str]], *,
                          instance_name: str = "instance1.example.org", instance_uuid: str | None = None,
                          nics: int | Sequence[str] = 0, params: Mapping[str, str] | None = None,
                          os_name: str = "cloudimage", debug: bool = False, reinstall: bool = False,
                          old_name: str | None = None) -> dict[str, str]:
    """The variables of a create (or, with ``old_name``, a rename) of ``instance_name``.

    ``nics`` is a count (MACs aa:00:00:00:00:NN) or the MACs themselves; ``params`` are OS
    parameters by name (``ssh_authorized_keys``), exported as ``OSP_SSH_AUTHORIZED_KEYS``.
    """
    env = {
        "PATH": GANETI_PATH,
        "OS_API_VERSION": API_VERSION,
        "OS_NAME": os_name,
        "OS_VARIANT": variant,
        "DEBUG_LEVEL": "1" if debug else "0",
        "INSTANCE_NAME": instance_name,
        "INSTANCE_UUID": instance_uuid or str(uuid.uuid5(uuid.NAMESPACE_DNS, instance_name)),
        "INSTANCE_OS": f"{os_name}+{variant}",
        "HYPERVISOR": "kvm",
        "DISK_COUNT": str(len(disks)),
    }
    for i, d in enumerate(disks):
        disk = d if isinstance(d, SimulatedDisk) else SimulatedDisk(d)
        env[f"DISK_{i}_PATH"] = os.fspath(disk.path)
        env[f"DISK_{i}_ACCESS"] = disk.access
        env[f"DISK_{i}_BACKEND_TYPE"] = disk.backend_type
        if disk.size_mib is not None:
            env[f"DISK_{i}_SIZE"] = str(disk.size_mib)
    macs = [simulated_mac(i) for i in range(nics)] if isinstance(nics, int) else list(nics)
    env["NIC_COUNT"] = str(len(macs))
    for i, mac in enumerate(macs):
        env[f"NIC_{i}_MAC"] = mac
    if reinstall:
        env["INSTANCE_REINSTALL"] = "1"
    if old_name is not None:
        env["OLD_INSTANCE_NAME"] = old_name
    for name, value in (params or {}).items():
        env["OSP_" + name.upper().replace("-", "_")] = value
    return env
