"""A first-boot systemd unit in a flamingo guest that runs the user-data's commands once per instance-id.

``runcmd`` and a ``#!`` user-data script cannot run on the host, and flamingo, which would run
them at every boot, cannot read them (seed/flamingo.py).  So the host installs, in the guest:

- ``/var/lib/instance-cloudimage/firstboot/`` (root, 0700): ``instance-id``, ``runcmd`` (the
  list as cloud-init's sh script) and/or ``user-script`` (run by its own ``#!`` line), each 0700;
- ``/etc/systemd/system/cloudimage-firstboot.service``, enabled for multi-user.target: a oneshot
  after network-online.target that runs ``run`` (below), which compares ``instance-id`` with the
  ``done`` marker, runs what is there, then writes the id into ``done``, whatever the exit
  codes (cloud-init's per-instance semantics: a failing command is logged, not retried).

A reinstall writes a new instance-id, so the commands run again; rename and import keep it.
"""

from __future__ import annotations

import os

from instance_cloudimage.disk.guestfiles import guest_dir, write_guest_file, write_guest_symlink
from instance_cloudimage.seed.flamingoconfig import FlamingoConfig

STATE_PARENT = "var/lib"
STATE_DIR = "instance-cloudimage/firstboot"
UNIT_NAME = "cloudimage-firstboot.service"
UNIT_DIR = "etc/systemd/system"
WANTS_DIR = "multi-user.target.wants"

RUNNER = """#!/bin/sh
# instance-cloudimage: runs the instance's user-data commands once per instance-id.
dir=/var/lib/instance-cloudimage/firstboot
id=$(cat "$dir/instance-id") || exit 1
if [ -f "$dir/done" ] && [ "$(cat "$dir/done")" = "$id" ]; then
    echo "already ran for instance $id"
    exit 0
fi
rc=0
for f in runcmd user-script; do
    [ -f "$dir/$f" ] || continue
    echo "running $f for instance $id"
    "$dir/$f" || { rc=$?; echo "$f failed with exit code $rc"; }
done
umask 077
printf '%s\\n' "$id" > "$dir/done"
exit "$rc"
"""

UNIT = """[Unit]
Description=Run the instance's user-data commands once per instance-id (instance-cloudimage)
Wants=network-online.target
After=network-online.target
ConditionPathExists=/var/lib/instance-cloudimage/firstboot/run

[Service]
Type=oneshot
ExecStart=/var/lib/instance-cloudimage/firstboot/run
RemainAfterExit=yes
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""


def install_first_boot(root_fd: int, cfg: FlamingoConfig, instance_id: str) -> bool:
    """Install the runner and its unit when ``cfg`` has commands; True if it did.

    Raises UnsafeImage for a symlink on the way, SeedError when the guest cannot be written.
    """
    if not cfg.first_boot:
        return False
    with guest_dir(root_fd, STATE_PARENT, create=True, mode=0o755) as parent, \
            guest_dir(parent, STATE_DIR, create=True, mode=0o700, shown_below=STATE_PARENT) as state:
        os.fchmod(state, 0o700)
        write_guest_file(state, "instance-id", instance_id.encode() + b"\n", mode=0o600)
        for name, text in (("runcmd", cfg.runcmd), ("user-script", cfg.script)):
            if text is not None:
                write_guest_file(state, name, text.encode("utf-8", "surrogateescape"), mode=0o700)
        write_guest_file(state, "run", RUNNER.encode(), mode=0o700)
    with guest_dir(root_fd, UNIT_DIR, create=True, mode=0o755) as units:
        write_guest_file(units, UNIT_NAME, UNIT.encode(), mode=0o644)
        with guest_dir(units, WANTS_DIR, create=True, mode=0o755, shown_below=UNIT_DIR) as wants:
            write_guest_symlink(wants, UNIT_NAME, f"/{UNIT_DIR}/{UNIT_NAME}")
    return True
