"""A tiny stand-in for the data side's ``instance_cloudimage.seeddata`` (built on another branch).

Only used while the real module is missing: ``install()`` registers it under the real name.  It
follows the agreed interface (seed_input, build_nocloud, build_configdrive returning SeedFiles)
and produces minimal but valid NoCloud and config-drive files.  Assertions in the tests compare
what cloud-init reads with what the (real or stand-in) builder produced, so they hold for both.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml


@dataclass(frozen=True)
class SeedInput:
    instance_id: str
    hostname: str
    keys: tuple[str, ...]
    macs: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SeedFiles:
    files: Mapping[str, bytes]


def seed_input(genv, variant) -> SeedInput:  # type: ignore[no-untyped-def]
    inst = genv.require_instance()
    keys = tuple(k.strip() for k in genv.params.get("ssh_authorized_keys", "").replace(";", "\n").splitlines()
                 if k.strip())
    suffix = "-r" if inst.reinstall else ""
    return SeedInput(f"iid-{inst.uuid}{suffix}", genv.params.get("hostname") or inst.name, keys,
                     tuple(n.mac for n in inst.nics))


def build_nocloud(inp: SeedInput) -> SeedFiles:
    meta = yaml.safe_dump({"instance-id": inp.instance_id, "local-hostname": inp.hostname}).encode()
    cfg = {"hostname": inp.hostname.split(".")[0], "fqdn": inp.hostname, "ssh_authorized_keys": list(inp.keys)}
    user = b"#cloud-config\n" + yaml.safe_dump(cfg, sort_keys=False, width=4096).encode()
    files = {"meta-data": meta, "user-data": user}
    if inp.macs:
        eths = {f"eth{i}": {"match": {"macaddress": m}, "set-name": f"eth{i}", "dhcp4": True}
                for i, m in enumerate(inp.macs)}
        files["network-config"] = yaml.safe_dump({"version": 2, "ethernets": eths}).encode()
    return SeedFiles(files)


def build_configdrive(inp: SeedInput) -> SeedFiles:
    meta = {"uuid": inp.instance_id, "hostname": inp.hostname, "name": inp.hostname,
            "public_keys": {"root": "\n".join(inp.keys)} if inp.keys else {}}
    user = b"#cloud-config\n" + yaml.safe_dump({"hostname": inp.hostname.split(".")[0],
                                                 "fqdn": inp.hostname}).encode()
    files = {}
    for version in ("latest", "2012-08-10"):
        files[f"openstack/{version}/meta_data.json"] = json.dumps(meta).encode()
        files[f"openstack/{version}/user_data"] = user
    return SeedFiles(files)


def install() -> types.ModuleType:
    """The real seeddata module when it exists, else this stand-in registered under its name."""
    try:
        return importlib.import_module("instance_cloudimage.seeddata")
    except ModuleNotFoundError:
        module = sys.modules[__name__]
        sys.modules["instance_cloudimage.seeddata"] = module
        return module
