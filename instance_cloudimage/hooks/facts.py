"""What a hook is told: its environment variables and the JSON file describing the instance.

The Ganeti variables are the parsed ``GanetiEnv`` written back out (nothing here reads
``os.environ``), so a hook sees exactly what this provider understood, in Ganeti's spelling.
Secret OS parameters are left out of both unless the site config passes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instance_cloudimage.ganeti.env import Disk, GanetiEnv, Instance, Nic
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.params.table import PARAMETERS
from instance_cloudimage.runtime.process import SAFE_PATH
from instance_cloudimage.sources.fetch import ImageRef

JSON_VERSION = 1
def secret_parameter_names() -> frozenset[str]:
    return frozenset(p.name for p in PARAMETERS if p.secret)


@dataclass(frozen=True)
class HookFacts:
    """Everything known about the create at the moment a phase's hooks run."""

    genv: GanetiEnv
    instance: Instance
    variant: Variant
    arch: str
    disk: Disk
    config_dir: Path
    image: ImageRef
    image_path: Path | None = None
    image_format: str | None = None
    image_virtual_size: int | None = None
    target: Path | None = None
    root_partition: str | None = None


def visible_parameters(params: Mapping[str, str], pass_secrets: bool) -> tuple[dict[str, str], list[str]]:
    """(parameters a hook may see, names of those withheld)."""
    if pass_secrets:
        return dict(params), []
    secret = secret_parameter_names()
    shown = {k: v for k, v in params.items() if k not in secret}
    return shown, sorted(k for k in params if k in secret)


def _disk_variables(d: Disk) -> dict[str, str]:
    p = f"DISK_{d.index}_"
    out = {p + "ACCESS": d.access}
    for key, value in (("PATH", d.path), ("URI", d.uri), ("BACKEND_TYPE", d.backend_type),
                       ("UUID", d.uuid), ("NAME", d.name),
                       ("SIZE", None if d.size_mib is None else str(d.size_mib))):
        if value is not None:
            out[p + key] = value
    return out


def _nic_variables(n: Nic) -> dict[str, str]:
    p = f"NIC_{n.index}_"
    out = {p + "MAC": n.mac}
    for key, value in (("MODE", n.mode), ("LINK", n.link), ("NAME", n.name), ("UUID", n.uuid),
                       ("BRIDGE", n.bridge), ("IP", None if n.ip is None else str(n.ip))):
        if value is not None:
            out[p + key] = value
    net = n.network
    if net is not None:
        out[p + "NETWORK_NAME"] = net.name
        out[p + "NETWORK_TAGS"] = " ".join(net.tags)
        for key, val in (("UUID", net.uuid), ("SUBNET", net.subnet), ("GATEWAY", net.gateway),
                         ("SUBNET6", net.subnet6), ("GATEWAY6", net.gateway6), ("MAC_PREFIX", net.mac_prefix)):
            if val is not None:
                out[p + "NETWORK_" + key] = str(val)
    return out


def ganeti_variables(genv: GanetiEnv, instance: Instance, params: Mapping[str, str]) -> dict[str, str]:
    """The Ganeti OS-interface variables for ``genv``, as Ganeti would have spelled them."""
    out = {
        "OS_API_VERSION": str(genv.api_version),
        "OS_NAME": genv.os_name,
        "OS_VARIANT": genv.variant,
        "DEBUG_LEVEL": str(genv.debug_level),
        "INSTANCE_NAME": instance.name,
        "INSTANCE_SECONDARY_NODES": " ".join(instance.secondary_nodes),
        "DISK_COUNT": str(len(instance.disks)),
        "NIC_COUNT": str(len(instance.nics)),
    }
    for key, value in (("INSTANCE_UUID", instance.uuid), ("INSTANCE_OS", instance.os),
                       ("HYPERVISOR", instance.hypervisor), ("INSTANCE_PRIMARY_NODE", instance.primary_node)):
        if value is not None:
            out[key] = value
    if instance.reinstall:
        out["INSTANCE_REINSTALL"] = "1"
    out.update({"INSTANCE_BE_" + k: v for k, v in instance.be.items()})
    out.update({"INSTANCE_HV_" + k: v for k, v in instance.hv.items()})
    for d in instance.disks:
        out.update(_disk_variables(d))
    for n in instance.nics:
        out.update(_nic_variables(n))
    # Ganeti upper-cases names and turns '-' into '_'; ganeti/env.py lower-cased them.
    out.update({"OSP_" + name.upper(): value for name, value in params.items()})
    return out


def hook_variables(facts: HookFacts, phase: str, *, params: Mapping[str, str], json_path: Path,
                   result_path: Path | None) -> dict[str, str]:
    """The complete environment of a hook (nothing is inherited)."""
    env = ganeti_variables(facts.genv, facts.instance, params)
    env.update({
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
        "HOOK_PHASE": phase,
        "VARIANT": facts.variant.name,
        "ARCH": facts.arch,
        "INSTANCE_JSON": os.fspath(json_path),
        "CONFIG_DIR": os.fspath(facts.config_dir),
        "CONFDATA": os.fspath(facts.config_dir / "hooks.d" / "confdata"),
        "BLOCKDEV": facts.disk.path or "",
        "IMAGE_URL": facts.image.location,
    })
    optional = {
        "HOOK_RESULT": None if result_path is None else os.fspath(result_path),
        "IMAGE_CHECKSUM": facts.image.checksum,
        "IMAGE_PATH": None if facts.image_path is None else os.fspath(facts.image_path),
        "IMAGE_FORMAT": facts.image_format,
        "TARGET": None if facts.target is None else os.fspath(facts.target),
        "ROOT_PARTITION": facts.root_partition,
    }
    env.update({k: v for k, v in optional.items() if v is not None})
    return env


def _disk_json(d: Disk) -> dict[str, Any]:
    return {"index": d.index, "path": d.path, "uri": d.uri, "size_mib": d.size_mib, "access": d.access,
            "backend_type": d.backend_type, "uuid": d.uuid, "name": d.name}


def _nic_json(n: Nic) -> dict[str, Any]:
    net = n.network
    network = None if net is None else {
        "name": net.name, "uuid": net.uuid, "tags": list(net.tags), "mac_prefix": net.mac_prefix,
        **{k: None if v is None else str(v) for k, v in (("subnet", net.subnet), ("gateway", net.gateway),
                                                         ("subnet6", net.subnet6), ("gateway6", net.gateway6))},
    }
    return {"index": n.index, "mac": n.mac, "mode": n.mode, "link": n.link,
            "ip": None if n.ip is None else str(n.ip), "name": n.name, "uuid": n.uuid, "bridge": n.bridge,
            "communication": n.is_communication, "network": network}


def describe_for_hooks(facts: HookFacts, phase: str, *, params: Mapping[str, str],
                       withheld: list[str]) -> dict[str, Any]:
    """The document behind $INSTANCE_JSON (its keys are part of the hook contract)."""
    inst, v, img = facts.instance, facts.variant, facts.image
    return {
        "version": JSON_VERSION,
        "phase": phase,
        "os": {"name": facts.genv.os_name, "variant": facts.genv.variant, "api_version": facts.genv.api_version,
               "debug_level": facts.genv.debug_level},
        "instance": {"name": inst.name, "uuid": inst.uuid, "os": inst.os, "hypervisor": inst.hypervisor,
                     "primary_node": inst.primary_node, "secondary_nodes": list(inst.secondary_nodes),
                     "reinstall": inst.reinstall, "be": dict(inst.be), "hv": dict(inst.hv)},
        "disks": [_disk_json(d) for d in inst.disks],
        "nics": [_nic_json(n) for n in inst.nics],
        "variant": {"name": v.name, "description": v.description, "agent": v.agent, "seed": v.seed,
                    "grow_root": v.grow_root, "architectures": list(v.architectures)},
        "arch": facts.arch,
        "image": {"location": img.location, "declared_format": img.declared_format, "checksum": img.checksum,
                  "from_parameter": img.from_parameter, "path": None if facts.image_path is None
                  else os.fspath(facts.image_path), "format": facts.image_format,
                  "virtual_size": facts.image_virtual_size},
        "parameters": dict(params),
        "withheld_parameters": withheld,
        "blockdev": facts.disk.path,
        "target": None if facts.target is None else os.fspath(facts.target),
        "root_partition": facts.root_partition,
    }
