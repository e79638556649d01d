"""Read a seed back with Debian's real cloud-init; run with /usr/bin/python3 (cloud-init's interpreter).

usage: read_seed_with_cloudinit.py nocloud|configdrive DIR

nocloud: DIR holds meta-data, user-data[, network-config]; it is read by cloud-init's own
DataSourceNoCloud (device scanning switched off with fs_label: null, so nothing on this host is
probed or mounted).  configdrive: DIR is the root of a config drive; it is read with
cloudinit.sources.helpers.openstack's ConfigDriveReader through DataSourceConfigDrive's
read_config_drive (the datasource class itself is not run: on a new instance-id it writes
"injected files" onto the running host).  Prints one JSON object.
"""

import json
import os
import shutil
import sys
import tempfile


def read_nocloud(seed: str) -> dict:
    from cloudinit import helpers
    from cloudinit.distros import debian
    from cloudinit.sources.DataSourceNoCloud import DataSourceNoCloud

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(seed, os.path.join(tmp, "cloud", "seed", "nocloud"))
        paths = helpers.Paths({"cloud_dir": os.path.join(tmp, "cloud"), "run_dir": os.path.join(tmp, "run")})
        cfg = {"datasource": {"NoCloud": {"fs_label": None}}}
        distro = debian.Distro("debian", {}, paths)
        ds = DataSourceNoCloud(cfg, distro, paths)
        if not ds.get_data():
            return {"claimed": False}
        return {
            "claimed": True,
            "seed": ds.seed,
            "instance_id": ds.get_instance_id(),
            "hostname": ds.get_hostname(fqdn=True).hostname,
            "local_hostname": ds.metadata.get("local-hostname"),
            "metadata": ds.metadata,
            "userdata_raw": (ds.get_userdata_raw() or b"").decode() if isinstance(ds.get_userdata_raw(), bytes)
            else ds.get_userdata_raw(),
            "network_config": ds.network_config,
        }


def read_configdrive(root: str) -> dict:
    from cloudinit.sources.DataSourceConfigDrive import read_config_drive

    results = read_config_drive(root)
    md = results.get("metadata", {})
    ud = results.get("userdata")
    return {
        "claimed": True,
        "version": results.get("version"),
        "instance_id": md.get("instance-id"),
        "hostname": md.get("local-hostname"),
        "public_keys": md.get("public-keys"),
        "metadata": md,
        "userdata_raw": ud.decode() if isinstance(ud, bytes) else ud,
    }


def main() -> None:
    kind, path = sys.argv[1], sys.argv[2]
    out = read_nocloud(path) if kind == "nocloud" else read_configdrive(path)
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
