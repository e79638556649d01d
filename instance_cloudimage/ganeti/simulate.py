"""A Ganeti-like environment for running the OS scripts outside Ganeti.

The one builder of what Ganeti 3.0 gives an OS script (the variables ``parse_environment``
reads), used by the console command's local ``create``, the benchmarks and the tests, so that
the three agree with each other and with the parser.  The variable names are those of
Ganeti 3.0's OS interface (ganeti-os-interface(7)), as a live cluster sets them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from instance_cloudimage.ganeti.env import Script

# What Ganeti's node daemon sets: a reset environment with this PATH.
GANETI_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"
API_VERSION = "20"


@dataclass(frozen=True)
class SimulatedDisk:
    """One disk: a kernel ``path`` (a block device, or a regular file for the file templates), a
    ``uri`` (the disk parameter ``access=userspace``), or both; Ganeti omits what a disk lacks."""

    path: str | os.PathLike[str] | None = None
    backend_type: str = "file:loop"
    size_mib: int | None = None
    access: str = "rw"
    uri: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.uri is None:
            raise ValueError("a simulated disk needs a path or a URI")


@dataclass(frozen=True)
class SimulatedTransfer:
    """What the import-export daemon adds for one run of ``script`` on disk ``index``.

    ``device`` is what export reads (Ganeti's snapshot of the disk) or import writes; by default
    the disk's own path.  ``size_fd`` is the descriptor export announces the stream's size on:
    Ganeti always passes one, None leaves ``EXP_SIZE_FD`` out.
    """

    script: Literal[Script.IMPORT, Script.EXPORT]
    index: int = 0
    device: str | os.PathLike[str] | None = None
    size_fd: int | None = None

    def __post_init__(self) -> None:
        if self.script not in (Script.IMPORT, Script.EXPORT):
            raise ValueError(f"only import and export transfer a disk, not {self.script}")


def simulated_mac(index: int) -> str:
    return f"aa:00:00:00:00:{index:02x}"


def simulated_core_environment(variant: str, *, params: Mapping[str, str] | None = None,
                               os_name: str = "cloudimage", debug: bool = False) -> dict[str, str]:
    """What every script gets (Ganeti's ``OSCoreEnv``), and all that verify gets.

    ``params`` are OS parameters by name (``ssh_authorized_keys``), exported as
    ``OSP_SSH_AUTHORIZED_KEYS``.
    """
    env = {
        "PATH": GANETI_PATH,
        "OS_API_VERSION": API_VERSION,
        "OS_NAME": os_name,
        "OS_VARIANT": variant,
        "DEBUG_LEVEL": "1" if debug else "0",
    }
    for name, value in (params or {}).items():
        env["OSP_" + name.upper().replace("-", "_")] = value
    return env


def simulated_environment(variant: str, disks: Sequence[SimulatedDisk | str | os.PathLike[str]], *,
                          instance_name: str = "instance1.example.org", instance_uuid: str | None = None,
                          nics: int | Sequence[str] = 0, params: Mapping[str, str] | None = None,
                          os_name: str = "cloudimage", debug: bool = False, reinstall: bool = False,
                          old_name: str | None = None, transfer: SimulatedTransfer | None = None) -> dict[str, str]:
    """The variables of a create of ``instance_name``; with ``old_name`` those of a rename, with
    ``transfer`` those of an import or export.

    ``nics`` is a count (MACs aa:00:00:00:00:NN) or the MACs themselves.
    """
    env = simulated_core_environment(variant, params=params, os_name=os_name, debug=debug) | {
        "INSTANCE_NAME": instance_name,
        "INSTANCE_UUID": instance_uuid or str(uuid.uuid5(uuid.NAMESPACE_DNS, instance_name)),
        "INSTANCE_OS": f"{os_name}+{variant}",
        "HYPERVISOR": "kvm",
        "DISK_COUNT": str(len(disks)),
    }
    described = [d if isinstance(d, SimulatedDisk) else SimulatedDisk(d) for d in disks]
    for i, disk in enumerate(described):
        if disk.path is not None:
            env[f"DISK_{i}_PATH"] = os.fspath(disk.path)
        if disk.uri is not None:
            env[f"DISK_{i}_URI"] = disk.uri
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
    if transfer is not None:
        env |= _transfer_variables(transfer, described[transfer.index])
    return env


def _transfer_variables(transfer: SimulatedTransfer, disk: SimulatedDisk) -> dict[str, str]:
    # The import-export daemon does not reset the environment; it adds LC_ALL=C.
    word = transfer.script.name
    env = {"LC_ALL": "C", f"{word}_INDEX": str(transfer.index)}
    device = transfer.device if transfer.device is not None else disk.path
    if device is not None:
        env[f"{word}_DEVICE"] = env[f"{word}_DISK_PATH"] = os.fspath(device)
    if disk.uri is not None:
        env[f"{word}_DISK_URI"] = disk.uri
    if transfer.size_fd is not None:
        env["EXP_SIZE_FD"] = str(transfer.size_fd)
    return env
