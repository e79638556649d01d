#!/usr/bin/python3
"""Many seeds' network configuration through Debian's own cloud-init 22.4, in one process.

Run with /usr/bin/python3 (cloud-init lives in /usr/lib/python3/dist-packages), never the venv:

    cloudinit_network.py WORK_DIR < cases.json > results.json

``cases.json`` is a list of ``{"id": ..., "kind": "nocloud" | "configdrive", "seed": DIR}``: a
NoCloud seed directory (as written into the guest or copied off a cidata disk) or the root of a
config drive.  For each case the datasource class cloud-init would use (DataSourceNoCloud,
DataSourceConfigDrive) reads the seed and yields its network configuration as the init-local stage
gets it; ``network_state`` parses it with ``skip_broken=False``, and every renderer a shipped
variant's distribution uses renders it into its own root under WORK_DIR:

* ``eni``: Debian 12 (ifupdown), with Debian's renderer config;
* ``netplan``: Ubuntu, parsed as the netplan renderer is given it (v2 passes through unchanged),
  then ``netplan generate --root-dir`` on the result, as Ubuntu's renderer runs it (postcmds);
* ``sysconfig`` and ``networkmanager``: the RHEL family, with RHEL's renderer config; each
  NetworkManager keyfile is then loaded and verified by libnm (gir1.2-nm-1.0), as the daemon would.

Any WARNING or ERROR cloud-init logs while reading, parsing or rendering counts as a failure: in a
guest, ``skip_broken=True`` turns a rejected command into a logged warning and a configuration
that is not what the seed says.  The result per case: ``{"id", "error", "warnings",
"network_config", "files": {renderer: {relative path: text}}}``.
"""

import json
import logging
import os
import re
import subprocess
import sys

import gi
from cloudinit.distros import debian, rhel
from cloudinit.net import eni, netplan, network_manager, network_state, sysconfig
from cloudinit.sources import DataSourceConfigDrive, DataSourceNoCloud

gi.require_version("NM", "1.0")
from cloudinit_reader import make_init  # noqa: E402 - this directory is the script's sys.path[0]
from gi.repository import NM, GLib  # noqa: E402 - after require_version, as PyGObject needs

# The generator 'netplan generate' runs, called directly: the Python wrapper costs 0.3 s a call.
NETPLAN_GENERATE = ["/usr/lib/netplan/generate"] if os.path.exists("/usr/lib/netplan/generate") \
    else ["/usr/sbin/netplan", "generate"]
NETPLAN_WARNING = re.compile(r"WARNING \*\*: [0-9:.]+: (.*)")
# Known and accepted: the seed writes gateway4/gateway6 on purpose (docs/seeding.md, Network).
GATEWAY_DEPRECATED = re.compile(r"`gateway[46]` has been deprecated")


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


def read_network_config(init, kind, seed):
    """What the datasource hands the init-local stage (stages.Init._find_networking_config)."""
    if kind == "nocloud":
        ds = DataSourceNoCloud.DataSourceNoCloud(init.cfg, init.distro, init.paths)
        ds.seed_dirs = [seed]
    else:
        ds = DataSourceConfigDrive.DataSourceConfigDrive(init.cfg, init.distro, init.paths)
        ds.seed_dir = seed
    # What get_data() also writes for 'cloud-init query' (instance-data.json) has no part in
    # the network configuration and is most of its cost.
    ds.persist_instance_data = lambda: True
    if not ds.get_data():
        raise RuntimeError(f"{kind} datasource did not claim {seed}")
    netcfg = ds.network_config
    if netcfg and "network" in netcfg:  # stages.Init._remove_top_level_network_key
        netcfg = netcfg["network"]
    return netcfg


def collect(root):
    files = {}
    for top, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            if os.path.islink(path):  # netplan's service links point into the root's /lib
                files[os.path.relpath(path, root)] = "-> " + os.readlink(path)
                continue
            with open(path) as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def verify_keyfile(path, text):
    """What NetworkManager itself says of a keyfile (libnm's reader and verify(), as the daemon
    loads a connection): a connection it refuses leaves the NIC unconfigured."""
    keyfile = GLib.KeyFile()
    keyfile.load_from_data(text, len(text.encode()), GLib.KeyFileFlags.NONE)
    try:
        NM.keyfile_read(keyfile, "/etc/NetworkManager/system-connections", NM.KeyfileHandlerFlags.NONE,
                        None, None).verify()
    except GLib.Error as e:
        raise RuntimeError(f"NetworkManager refuses {os.path.basename(path)}: {e.message}") from None


def render(netcfg, root):
    out = {}
    for name, renderer in (
        ("eni", eni.Renderer(debian.Distro.renderer_configs["eni"])),
        ("sysconfig", sysconfig.Renderer(rhel.Distro.renderer_configs["sysconfig"])),
        ("networkmanager", network_manager.Renderer()),
    ):
        target = os.path.join(root, name)
        os.makedirs(target)
        # A fresh parse for each: a guest runs one renderer, and the ENI renderer edits the state.
        renderer.render_network_state(network_state.parse_net_config_data(netcfg, skip_broken=False), target=target)
        out[name] = collect(target)
    for path, text in out["networkmanager"].items():
        if path.endswith(".nmconnection"):
            verify_keyfile(path, text)
    # Ubuntu: netplan is both the parser's renderer (v2 passes through) and the one that renders.
    # Its path must be relative: 22.4 joins it to the target, so the distro's absolute
    # /etc/netplan/50-cloud-init.yaml would land on this host.  postcmds would run 'netplan
    # generate' on the host too; it runs below with --root-dir instead.
    config = {**debian.Distro.renderer_configs["netplan"], "postcmds": False, "features": []}
    config["netplan_path"] = config["netplan_path"].lstrip("/")
    planner = netplan.Renderer(config)
    target = os.path.join(root, "netplan")
    os.makedirs(target)
    planner.render_network_state(
        network_state.parse_net_config_data(netcfg, skip_broken=False, renderer=planner), target=target)
    # 0600 as netplan wants and newer cloud-init writes it (22.4 leaves 0644, which netplan warns about).
    os.chmod(os.path.join(target, config["netplan_path"]), 0o600)
    proc = subprocess.run([*NETPLAN_GENERATE, "--root-dir", target], capture_output=True, text=True, check=False)
    complaints = [w for w in NETPLAN_WARNING.findall(proc.stderr) if not GATEWAY_DEPRECATED.match(w)]
    if proc.returncode != 0 or complaints or "ERROR" in proc.stderr:
        raise RuntimeError(f"netplan generate: rc {proc.returncode}: {proc.stderr.strip()}")
    out["netplan"] = collect(target)
    return out


def run_case(init, case, work, recorder, rendered):
    """Read one seed; render its network configuration unless an equal one was rendered already
    (``rendered``: canonical JSON → (error, warnings, files))."""
    recorder.records.clear()
    result = {"id": case["id"], "error": None, "warnings": [], "network_config": None, "files": {}}
    try:
        netcfg = read_network_config(init, case["kind"], case["seed"])
    except Exception as e:  # any exception is the finding
        result["error"] = f"{type(e).__name__}: {e}"
        result["warnings"] = list(recorder.records)
        return result
    result["network_config"] = netcfg
    read_warnings = list(recorder.records)
    if netcfg:
        key = json.dumps(netcfg, sort_keys=True)
        if key not in rendered:
            recorder.records.clear()
            # Left in place (WORK_DIR is the caller's to remove): deleting each tree costs more
            # than rendering it.
            root = os.path.join(work, "render", str(len(rendered)))
            error, files = None, {}
            try:
                files = render(netcfg, root)
            except Exception as e:  # any exception is the finding
                error = f"{type(e).__name__}: {e}"
            rendered[key] = (error, list(recorder.records), files)
        result["error"], render_warnings, result["files"] = rendered[key]
        read_warnings += render_warnings
    result["warnings"] = read_warnings
    return result


def main(argv):
    # handle_physical() dumps the whole state as YAML for a debug message it never logs (22.4):
    # two thirds of the parser's time, and no part of its result.
    network_state.NetworkStateInterpreter.dump_network_state = lambda self: ""
    work = os.path.abspath(argv[1])
    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    logging.getLogger().setLevel(logging.WARNING)
    init = make_init(work)
    cases = json.load(sys.stdin)
    rendered = {}
    results = [run_case(init, case, work, recorder, rendered) for case in cases]
    json.dump(results, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
