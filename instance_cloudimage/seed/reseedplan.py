"""What re-seeding an imported disk changes, as data: pure functions, no disks (seed/reseed.py applies it).

The parts of a seed that describe the instance are regenerated from the import-time environment
exactly as create builds them (seed/content.py, seed/configdrive.py): the network configuration, the host
name in the metadata (and the config drive's ``name``/``meta``), and the instance-id when, and
only when, the guest needs a new one.  User-data, SSH keys and the password stay as the seed has
them: the seed on the disk is the instance's truth.  Secret parameters (user-data, a password
hash) never reach import, the parameters in an export's config.ini may be older than what the
guest was given, and an import restores an instance rather than reconfiguring its credentials.

Instance-id, from cloud-init 22.4's source: NoCloud and ConfigDrive both apply network
configuration only on ``boot-new-instance`` by default (``DataSource.default_update_events``);
``boot`` and ``boot-legacy`` are supported but must be enabled, ``updates: {network: {when:
[boot]}}``.  With the same instance-id a booted guest never applies a new network configuration:
NoCloud's quick check reads that id from the seed directory and keeps the cached datasource; a
seed disk or config drive is read again, but the same id is still no new instance.  So the id
changes when the network configuration changed (compared as data), unless the agent is flamingo
(which reads no network configuration), the seed's user-data enables network updates at every
boot, or the administrator keeps it (``keep_instance_id``, ``[Import] KeepInstanceId``).  The new
id is create's, the new INSTANCE_UUID (under KVM also the DMI system UUID ConfigDrive compares
with); a seed that already has it gets a fresh one derived from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from instance_cloudimage.runtime.errors import SeedError
from instance_cloudimage.runtime.settings import parse_bool
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.configdrive import dump_json, render_meta_data_json, render_network_data_json
from instance_cloudimage.seed.content import SeedInput, derive_instance_id, dump_yaml, render_network_config
from instance_cloudimage.seed.userdata import YAML_FAILURES, cloud_config_parts

NOCLOUD_FILES = ("meta-data", "user-data", "network-config")
CD_TREES = ("openstack/latest", "openstack/2012-08-10")
CD_META, CD_USER, CD_NET = "meta_data.json", "user_data", "network_data.json"
# cloud-init's EventType values that re-apply network configuration on a boot of the same instance.
EVERY_BOOT_EVENTS = frozenset({"boot", "boot-legacy"})
UNREADABLE = object()
KEPT = "keep_instance_id is set"


@dataclass(frozen=True)
class SeedUpdate:
    """What re-seeding changes in one seed: files to write and remove (relative paths), and why."""

    write: Mapping[str, bytes]
    remove: tuple[str, ...]
    network_changed: bool
    old_id: str | None
    new_id: str | None
    id_reason: str
    old_macs: tuple[str, ...]
    new_macs: tuple[str, ...]

    @property
    def id_changed(self) -> bool:
        return self.new_id != self.old_id

    @property
    def empty(self) -> bool:
        return not self.write and not self.remove


def parse_config(data: bytes | None) -> Any:
    """YAML or JSON (JSON is YAML) as data; None for no file, UNREADABLE when it does not parse."""
    if data is None:
        return None
    try:
        return yaml.safe_load(data)
    except YAML_FAILURES:  # the guest wrote it
        return UNREADABLE


def network_differs(old: bytes | None, new: bytes | None) -> bool:
    """Whether the guest would get a different network configuration: compared as data, so a
    difference in formatting alone is no change (and never costs an instance-id)."""
    before, after = parse_config(old), parse_config(new)
    return before is UNREADABLE or before != after


def macs_in(data: bytes | None) -> tuple[str, ...]:
    """The MACs a network-config (v1 or v2) or network_data.json matches NICs by, in order."""
    cfg = parse_config(data)
    if not isinstance(cfg, dict):
        return ()
    if isinstance(cfg.get("network"), dict):
        cfg = cfg["network"]
    found: list[Any] = []
    if isinstance(cfg.get("ethernets"), dict):
        found = [(e.get("match") or {}).get("macaddress") for e in cfg["ethernets"].values() if isinstance(e, dict)]
    elif isinstance(cfg.get("config"), list):
        found = [e.get("mac_address") for e in cfg["config"] if isinstance(e, dict)]
    elif isinstance(cfg.get("links"), list):
        found = [e.get("ethernet_mac_address") for e in cfg["links"] if isinstance(e, dict)]
    return tuple(str(m).lower() for m in found if m)


def cloud_config_documents(user_data: bytes | None) -> list[Any]:
    """The cloud-config documents of a seed's user-data: itself, or its MIME text/cloud-config parts."""
    if not user_data:
        return []
    return [parse_config(payload) for _, payload in cloud_config_parts(user_data)[1]]


def network_applied_every_boot(user_data: bytes | None) -> bool:
    """Whether the user-data enables cloud-init's per-boot network updates
    (``updates: {network: {when: [boot]}}``, or ``boot-legacy``)."""
    for doc in cloud_config_documents(user_data):
        updates = doc.get("updates") if isinstance(doc, dict) else None
        network = updates.get("network") if isinstance(updates, dict) else None
        when = network.get("when") if isinstance(network, dict) else None
        if isinstance(when, list) and EVERY_BOOT_EVENTS.intersection(str(w) for w in when):
            return True
    return False


def choose_instance_id(current: str | None, candidate: str, fallback: str, *, network_changed: bool, agent: str,
                       keep: bool, every_boot: bool) -> tuple[str | None, str]:
    """The instance-id after an import, and why.  ``candidate`` is create's id for the instance
    (its new INSTANCE_UUID); ``fallback`` a fresh one, for when the seed already has that id."""
    if not network_changed:
        return current, "the network configuration did not change"
    if agent == "flamingo":
        return current, "flamingo reads no network configuration from the seed"
    if every_boot:
        return current, "the user-data has cloud-init apply network configuration at every boot"
    if keep:
        return current, KEPT
    new = candidate if candidate != current else fallback
    return new, "cloud-init applies a changed network configuration only to a new instance-id"


def keep_instance_id(params: Mapping[str, str], site: SiteConfig) -> bool:
    """The keep_instance_id parameter, else the site's [Import] KeepInstanceId."""
    value = (params.get("keep_instance_id") or "").strip()
    if value:
        try:
            return parse_bool(value)
        except ValueError:
            raise SeedError("keep_instance_id must be yes or no") from None
    return bool(site.get("import_keep_instance_id"))


def decide_id(inp: SeedInput, current: str | None, changed: bool, keep: bool,
              user_data: bytes | None) -> tuple[str | None, str]:
    fallback = derive_instance_id(replace(inp.instance, reinstall=True))
    return choose_instance_id(current, inp.instance_id, fallback, network_changed=changed, agent=inp.agent,
                              keep=keep, every_boot=network_applied_every_boot(user_data))


def _metadata(data: bytes | None, what: str) -> dict[str, Any]:
    md = parse_config(data)
    if not isinstance(md, dict):
        raise SeedError(f"the seed's {what} cannot be read; it was left as it is")
    return md


def plan_nocloud(files: Mapping[str, bytes], inp: SeedInput, *, keep: bool) -> SeedUpdate:
    """The update of a NoCloud seed (directory or cidata disk) for the instance in ``inp``."""
    md = _metadata(files.get("meta-data"), "meta-data")
    old_net, new_net = files.get("network-config"), render_network_config(inp)
    changed = network_differs(old_net, new_net)
    current = str(md["instance-id"]) if md.get("instance-id") else None
    new_id, why = decide_id(inp, current, changed, keep, files.get("user-data"))
    new_md = {**md, "local-hostname": inp.hostname.full}
    if new_id is not None:
        new_md["instance-id"] = new_id
    write: dict[str, bytes] = {}
    if new_md != md:
        write["meta-data"] = dump_yaml(new_md)
    if changed and new_net is not None:
        write["network-config"] = new_net
    remove = ("network-config",) if changed and new_net is None and old_net is not None else ()
    return SeedUpdate(write, remove, changed, current, new_id, why, macs_in(old_net), macs_in(new_net))


def plan_configdrive(files: Mapping[str, bytes], inp: SeedInput, *, keep: bool) -> SeedUpdate:
    """The update of a config-2 drive: both trees, as create writes them."""
    trees = [t for t in CD_TREES if f"{t}/{CD_META}" in files]
    if not trees:
        raise SeedError("the config drive has no meta_data.json; it was left as it is")
    first = trees[0]
    old_net = files.get(f"{first}/{CD_NET}")
    new_net = render_network_data_json(inp)
    changed = network_differs(old_net, new_net)
    md = _metadata(files[f"{first}/{CD_META}"], "meta_data.json")
    current = str(md["uuid"]) if md.get("uuid") else None
    new_id, why = decide_id(inp, current, changed, keep, files.get(f"{first}/{CD_USER}"))
    ours = render_meta_data_json(inp)
    write: dict[str, bytes] = {}
    remove: list[str] = []
    for tree in trees:
        md = _metadata(files[f"{tree}/{CD_META}"], f"{tree}/{CD_META}")
        meta = md["meta"] if isinstance(md.get("meta"), dict) else {}
        new_md = {**md, "name": ours["name"], "hostname": ours["hostname"], "meta": {**meta, **ours["meta"]}}
        if new_id is not None:
            new_md["uuid"] = new_id
        if new_md != md:
            write[f"{tree}/{CD_META}"] = dump_json(new_md)
        if changed and new_net is not None:
            write[f"{tree}/{CD_NET}"] = new_net
        elif changed and f"{tree}/{CD_NET}" in files:
            remove.append(f"{tree}/{CD_NET}")
    return SeedUpdate(write, tuple(remove), changed, current, new_id, why, macs_in(old_net), macs_in(new_net))


def describe_update(update: SeedUpdate) -> str:
    """One line for the import log: what changed in the seed and what it means for the guest."""
    parts = []
    if update.network_changed:
        parts.append(f"network configuration now for MAC {', '.join(update.new_macs) or 'none'} "
                     f"(was {', '.join(update.old_macs) or 'none'})")
    if update.id_changed:
        parts.append(f"new instance-id {update.new_id} ({update.id_reason}): cloud-init runs its per-instance "
                     "modules again at the next boot (new SSH host keys, user-data runs again; "
                     "keep_instance_id=yes avoids this)")
    elif update.network_changed:
        parts.append(f"instance-id kept ({update.id_reason})")
    if not parts:
        parts.append("host name")
    return "; ".join(parts)
