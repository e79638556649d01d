"""The metad refresh unit, as cloud-config: what the seed adds so that the guest applies metad's
live parameters at every boot (the guest side is seed/metadguest.py, installed as it is).

Only for cloud-init variants whose instance has Ganeti's instance-communication NIC (metad is
reached over it, nothing else), and unless the ``metad_refresh`` parameter or the site's
``[Seed] MetadRefresh`` turns it off.  The unit goes in through the cloud-config the provider
writes anyway: ``write_files`` (the script, the unit, and what the seed set, to compare with) and
one ``runcmd`` entry that enables the unit, so it runs from the second boot on (the first boot
has the seed's values already).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from instance_cloudimage.ganeti.env import Instance
from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.runtime.settings import parse_bool

PARAM = "metad_refresh"
SCRIPT_PATH = "/usr/local/lib/instance-cloudimage/metad-refresh"
CONFIG_PATH = "/etc/instance-cloudimage/metad.json"
UNIT_NAME = "cloudimage-metad.service"
UNIT = f"""[Unit]
Description=Apply Ganeti metad's live OS parameters (instance-cloudimage)
Wants=network-online.target
After=network-online.target cloud-init.service
ConditionPathExists={CONFIG_PATH}

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 {SCRIPT_PATH}
TimeoutStartSec=60

[Install]
WantedBy=multi-user.target
"""


def refresh_requested(params: Mapping[str, str], site_default: bool) -> bool:
    """The ``metad_refresh`` parameter, else the site's [Seed] MetadRefresh."""
    raw = (params.get(PARAM) or "").strip()
    if not raw:
        return site_default
    try:
        return parse_bool(raw)
    except ValueError:
        raise ParameterError(f"{PARAM} must be yes or no") from None


def has_metad(instance: Instance) -> bool:
    return any(nic.is_communication for nic in instance.nics)


def guest_script() -> str:
    return Path(__file__).with_name("metadguest.py").read_text(encoding="utf-8")


def metad_cloud_config(user: str | None, hostname: str, keys: list[str]) -> dict[str, Any]:
    """write_files and runcmd that install and enable the unit; what the seed set goes with it."""
    seeded = {"user": user, "hostname": hostname, "ssh_authorized_keys": keys}
    return {
        "write_files": [
            {"path": SCRIPT_PATH, "permissions": "0755", "owner": "root:root", "content": guest_script()},
            {"path": f"/etc/systemd/system/{UNIT_NAME}", "permissions": "0644", "owner": "root:root",
             "content": UNIT},
            {"path": CONFIG_PATH, "permissions": "0644", "owner": "root:root",
             "content": json.dumps(seeded, indent=1) + "\n"},
        ],
        "runcmd": [["systemctl", "enable", UNIT_NAME]],
    }
