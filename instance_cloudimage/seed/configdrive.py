"""OpenStack config drive (``config-2``) contents, for cloud-init's ConfigDrive and flamingo.

Both ``openstack/latest`` and ``openstack/2012-08-10`` get the same files: flamingo reads only
2012-08-10 (its docs say latest), cloud-init takes the newest dated tree it knows and falls back
to latest.

For flamingo variants the drive is written in the form flamingo's code reads: ``public_keys``
keyed by Linux user name, one user-data document starting with exactly ``#cloud-config\\n``,
``meta`` a string-to-string map; a user script becomes that document's last ``runcmd`` entry, run
from a private temporary file so its own ``#!`` line picks the interpreter.  Flamingo as released
never reads the drive (seed/flamingo.py: the host applies all of it instead); the drive is for
cloudbase-init-style tools and the administrator, and tells them what the host applied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from instance_cloudimage.seed.content import SeedFiles, SeedInput, cloud_init_config, network_plan
from instance_cloudimage.seed.network import render_network_data
from instance_cloudimage.seed.userdata import (
    Kind,
    UserData,
    assemble_for_cloud_init,
    merge_configs,
    render_cloud_config,
)

VERSIONS = ("latest", "2012-08-10")
# $1 is the script; "$f" runs it by its own #! line.  umask keeps it private; rm on every path.
RUN_USER_SCRIPT = ('umask 077; f=$(mktemp /root/.user-data.XXXXXX) || exit 1; printf "%s" "$1" > "$f" '
                   '&& chmod 700 "$f" && "$f"; rc=$?; rm -f "$f"; exit $rc')


def flamingo_config(inp: SeedInput) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    user = inp.default_user or "root"
    if inp.ssh_keys and user == "root":
        # Repeats meta_data's public_keys in the cloud-config, where a reader of the drive that
        # takes only user_data (flamingo's code gives these keys to root) finds them too.
        cfg["ssh_authorized_keys"] = [k.line for k in inp.ssh_keys]
    if inp.password_hash:
        cfg["runcmd"] = [["usermod", "-p", inp.password_hash, user]]
    return cfg


def assemble_for_flamingo(ours: Mapping[str, Any], user: UserData | None) -> str:
    if user is None:
        return render_cloud_config(ours)
    if user.kind is Kind.CLOUD_CONFIG:
        return render_cloud_config(merge_configs(ours, user.config or {}))
    if user.kind is Kind.SCRIPT:
        script = {"runcmd": [["sh", "-c", RUN_USER_SCRIPT, "sh", user.text]]}
        return render_cloud_config(merge_configs(ours, script))
    # seed_input refuses the other kinds for flamingo variants.
    raise ValueError(f"flamingo cannot take user-data of kind {user.kind.value}")


def _public_keys(inp: SeedInput) -> dict[str, str]:
    if inp.agent == "flamingo":
        return {inp.default_user or "root": "\n".join(k.line for k in inp.ssh_keys)} if inp.ssh_keys else {}
    # Nova's form, one key per name; cloud-init gives every value to the default user.
    return {f"key-{i}": k.line for i, k in enumerate(inp.ssh_keys)}


def render_meta_data_json(inp: SeedInput) -> dict[str, Any]:
    md: dict[str, Any] = {
        "uuid": inp.instance_id,
        "name": inp.instance.name,
        "hostname": inp.hostname.full,
        "launch_index": 0,
        "public_keys": _public_keys(inp),
        "keys": [{"name": f"key-{i}", "type": "ssh", "data": k.line} for i, k in enumerate(inp.ssh_keys)],
        "meta": {"ganeti_instance_name": inp.instance.name, "ganeti_instance_uuid": inp.instance.uuid or ""},
    }
    return md


def dump_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def render_network_data_json(inp: SeedInput) -> bytes | None:
    plan = network_plan(inp)
    return None if plan is None else dump_json(render_network_data(plan))


def build_configdrive(inp: SeedInput) -> SeedFiles:
    """openstack/{latest,2012-08-10}/{meta_data.json,user_data,network_data.json,vendor_data.json}."""
    tree: dict[str, bytes] = {"meta_data.json": dump_json(render_meta_data_json(inp))}
    if inp.agent == "flamingo":
        tree["user_data"] = assemble_for_flamingo(flamingo_config(inp), inp.user_data).encode()
    else:
        out = assemble_for_cloud_init(cloud_init_config(inp), inp.user_data)
        tree["user_data"] = out.user_data.encode()
        if out.vendor_data is not None:
            tree["vendor_data.json"] = dump_json({"cloud-init": out.vendor_data})
    network = render_network_data_json(inp)
    if network is not None:
        tree["network_data.json"] = network
    files = {f"openstack/{v}/{name}": data for v in VERSIONS for name, data in tree.items()}
    return SeedFiles(files)
