#!/usr/bin/python3
"""Read a seed back with Debian's own cloud-init and print what it saw, as JSON.

Run with /usr/bin/python3 (cloud-init lives in /usr/lib/python3/dist-packages), never the venv:

    cloudinit_reader.py nocloud SEED_DIR WORK_DIR
    cloudinit_reader.py configdrive DRIVE_DIR WORK_DIR
    cloudinit_reader.py network CONFIG_FILE WORK_DIR   (YAML network-config or network_data.json)
    cloudinit_reader.py boot-nocloud SEED_DIR WORK_DIR   (one boot's init-local stage, see simulate_boot)
    cloudinit_reader.py boot-configdrive DRIVE_DIR WORK_DIR

Everything cloud-init writes goes under WORK_DIR (its cloud_dir and run_dir are moved there).
The datasource code, the user-data processor, the part handlers (cloud-config, shell script,
jinja), the config merger, cc_set_passwords/cc_users_groups and the network parser and renderers
are cloud-init's own.  Only the calls that would change this host are replaced by recorders
(distro.create_user/create_group/chpasswd); boothooks and part-handlers, which execute user
code on the spot, are not run.  The netplan renderer is never used: in 22.4 it writes into the
host's /etc/netplan whatever target it is given.
"""

import copy
import json
import logging
import os
import shutil
import sys

from cloudinit import cloud as ci_cloud
from cloudinit import helpers, sources, ssh_util, stages, util
from cloudinit.config import cc_set_passwords, cc_users_groups
from cloudinit.distros import rhel, ug_util
from cloudinit.handlers.boot_hook import BootHookPartHandler
from cloudinit.net import eni, network_state, networkd, sysconfig
from cloudinit.settings import PER_INSTANCE
from cloudinit.sources import DataSourceConfigDrive, DataSourceNoCloud
from cloudinit.sources.helpers import openstack

LOG = logging.getLogger("reader")


def base_config(work):
    cfg = stages.fetch_base_config()
    cfg.setdefault("system_info", {})["paths"] = {
        "cloud_dir": os.path.join(work, "cloud"),
        "run_dir": os.path.join(work, "run"),
        "templates_dir": "/etc/cloud/templates",
    }
    # Never probe the host's block devices for a cidata/config-2 label.
    cfg["datasource"] = {"NoCloud": {"fs_label": None}, "ConfigDrive": {"dslist": []}}
    cfg.pop("def_log_file", None)
    return cfg


def make_init(work):
    base = base_config(work)

    class ReaderInit(stages.Init):
        def _read_cfg(self, extra_fns):
            return copy.deepcopy(base)

    init = ReaderInit(ds_deps=[])
    for d in init._initial_subdirs():
        os.makedirs(d, exist_ok=True)
    return init


def walk_parts(msg):
    parts = []
    if msg is None:
        return parts
    for part in msg.walk():
        if part.get_content_maintype() == "multipart":
            continue
        payload = util.fully_decoded_payload(part)
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8", "replace")
        parts.append({"content_type": part.get_content_type(), "filename": part.get_filename(),
                      "merge_type": part.get("Merge-Type"), "payload": payload})
    return parts


def render_network(netcfg, work):
    """Parse with network_state, render eni, networkd and sysconfig into WORK/render."""
    if netcfg and "network" in netcfg:  # what stages._remove_top_level_network_key does
        netcfg = netcfg["network"]
    ns = network_state.parse_net_config_data(netcfg)
    target = os.path.join(work, "render")
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    eni.Renderer({"eni_path": "etc/network/interfaces",
                  "netrules_path": "etc/udev/rules.d/70-persistent-net.rules"}).render_network_state(ns, target=target)
    networkd.Renderer({}).render_network_state(ns, target=target)
    sysconfig.Renderer(rhel.Distro.renderer_configs["sysconfig"]).render_network_state(ns, target=target)
    files = {}
    for root, _dirs, names in os.walk(target):
        for name in names:
            path = os.path.join(root, name)
            with open(path) as f:
                files[os.path.relpath(path, target)] = f.read()
    interfaces = []
    for iface in ns.iter_interfaces():
        interfaces.append({"name": iface["name"], "mac_address": iface.get("mac_address"),
                           "subnets": iface.get("subnets", [])})
    return {"interfaces": interfaces, "routes": list(ns.iter_routes()),
            "dns_nameservers": ns.dns_nameservers, "dns_searchdomains": ns.dns_searchdomains, "files": files}


def read_datasource(kind, src, work):
    init = make_init(work)
    paths = init.paths
    seed = os.path.join(paths.seed_dir, "nocloud" if kind == "nocloud" else "config_drive")
    shutil.copytree(src, seed)
    cls = DataSourceNoCloud.DataSourceNoCloud if kind == "nocloud" else DataSourceConfigDrive.DataSourceConfigDrive
    ds = cls(init.cfg, init.distro, paths)
    if not ds.get_data():
        return {"claimed": False}
    init.datasource = ds
    init._reset()  # as Init.fetch() does: the paths object must know the datasource now
    init.instancify()
    init.update()

    # consume_data(), minus the handlers that execute user code on this host.
    handlers = [h for h in init._default_handlers() if not isinstance(h, BootHookPartHandler)]
    init._do_handlers(ds.get_userdata(True), handlers, PER_INSTANCE)
    init._consume_vendordata("vendordata", PER_INSTANCE)
    init._reset()

    merged = helpers.ConfigMerger(paths=init.paths, datasource=ds, additional_fns=[], base_cfg=init.cfg).cfg
    distro = init.distro
    calls = {"create_user": [], "create_group": [], "chpasswd": [], "expire_passwd": []}
    distro.create_user = lambda name, **kw: calls["create_user"].append({"name": name, **kw})
    distro.create_group = lambda name, members=None: calls["create_group"].append(name)
    distro.chpasswd = lambda plist, hashed: calls["chpasswd"].append({"list": plist, "hashed": hashed})
    distro.expire_passwd = lambda user: calls["expire_passwd"].append(user)
    cloud = ci_cloud.Cloud(ds, init.paths, merged, distro, helpers.Runners(init.paths))
    cc_users_groups.handle("users_groups", copy.deepcopy(merged), cloud, LOG, [])
    cc_set_passwords.handle("set_passwords", copy.deepcopy(merged), cloud, LOG, [])
    users, _groups = ug_util.normalize_users_groups(copy.deepcopy(merged), distro)
    default_user, _ = ug_util.extract_default(users)

    # cc_ssh's key collection, then ssh_util's authorized_keys writer on an empty file.
    keys = list(cloud.get_public_ssh_keys() or []) if merged.get("allow_public_ssh_keys", True) else []
    keys.extend(merged.get("ssh_authorized_keys") or [])
    parser = ssh_util.AuthKeyLineParser()
    authorized_keys = ssh_util.update_authorized_keys([], [parser.parse(str(k)) for k in keys])

    hostname, fqdn, _ = util.get_hostname_fqdn(merged, cloud)
    scripts_dir = init.paths.get_ipath("scripts")
    scripts = {}
    for name in sorted(os.listdir(scripts_dir)) if os.path.isdir(scripts_dir) else []:
        path = os.path.join(scripts_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                scripts[name] = f.read()

    netcfg = ds.network_config
    keep = ("manage_etc_hosts", "user", "users", "ssh_authorized_keys", "runcmd", "write_files", "hostname",
            "fqdn", "chpasswd", "password", "packages", "bootcmd", "ssh_pwauth", "vendor_data", "final_message")
    out = {
        "claimed": True,
        "dsname": ds.dsname,
        "instance_id": ds.get_instance_id(),
        "local_hostname": ds.get_hostname().hostname,
        "local_fqdn": ds.get_hostname(fqdn=True).hostname,
        "hostname": hostname,
        "fqdn": fqdn,
        "public_keys": ds.get_public_ssh_keys(),
        "authorized_keys": authorized_keys,
        "default_user": default_user,
        "users": users,
        "calls": calls,
        "userdata_raw": (ds.get_userdata_raw() or b"").decode("utf-8", "replace")
        if isinstance(ds.get_userdata_raw(), bytes) else ds.get_userdata_raw(),
        "parts": walk_parts(ds.get_userdata()),
        "vendor_parts": walk_parts(ds.get_vendordata()),
        "merged": {k: merged[k] for k in keep if k in merged},
        "scripts": scripts,
        "network_config": netcfg,
        "network": render_network(netcfg, work) if netcfg else None,
    }
    return out


def simulate_boot(kind, src, work):
    """One boot of a guest whose seed is ``src``, as cloud-init's init-local stage runs it
    (cmd/main.py main_init: fetch with the cache check, instancify, apply_network_config).

    WORK/cloud is the guest's /var/lib/cloud and persists from one call to the next; WORK/run is
    its /run, a tmpfs, so it is emptied first.  What would change this host (rendering and
    bringing up the network, renaming NICs) is recorded instead.  Returns whether cloud-init
    took the boot for a new instance and the network configuration it applied (None: none).
    """
    work = os.path.abspath(work)  # the instance link cloud-init writes must not be relative
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)
    base = base_config(work)
    base["datasource_list"] = ["NoCloud" if kind == "nocloud" else "ConfigDrive"]
    base.pop("network", None)  # this host's own cloud.cfg must not decide for the guest

    class BootInit(stages.Init):
        def _read_cfg(self, extra_fns):
            return copy.deepcopy(base)

    init = BootInit(ds_deps=[sources.DEP_FILESYSTEM])
    init.initialize()
    seed = os.path.join(init.paths.seed_dir, "nocloud" if kind == "nocloud" else "config_drive")
    shutil.rmtree(seed, ignore_errors=True)
    shutil.copytree(src, seed)
    init.fetch(existing="check")
    restored = init.ds_restored
    init.instancify()
    applied = []
    distro = init.distro
    distro.apply_network_config = lambda netcfg, bring_up=False: applied.append(netcfg)
    distro.networking.wait_for_physdevs = lambda netcfg, strict=True: None
    distro.networking.apply_network_config_names = lambda netcfg, **kw: None
    init.apply_network_config(bring_up=False)
    return {"instance_id": init.datasource.get_instance_id(), "restored_from_cache": restored,
            "new_instance": init.is_new_instance(), "applied": applied[0] if applied else None}


def main(argv):
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    kind, src, work = argv[1], argv[2], argv[3]
    if kind in ("nocloud", "configdrive"):
        result = read_datasource(kind, src, work)
    elif kind in ("boot-nocloud", "boot-configdrive"):
        result = simulate_boot(kind.removeprefix("boot-"), src, work)
    elif kind == "network":
        with open(src) as f:
            text = f.read()
        if src.endswith(".json"):
            cfg = openstack.convert_net_json(json.loads(text), known_macs={})
        else:
            cfg = util.load_yaml(text)
        result = render_network(cfg, work)
    else:
        raise SystemExit(f"unknown command {kind}")
    json.dump(result, sys.stdout, default=str, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
