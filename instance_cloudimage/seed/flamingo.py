"""Making a flamingo image boot with its hostname and SSH keys.

flamingo (tmrts/flamingo) looks for a config drive with
``blkid "-t LABEL='config-2'" -odevice`` and ``findmnt ... "--output TARGET"``, each passing an
option and its value as ONE argument.  Measured on this node (util-linux 2.38): that blkid call
finds nothing (exit 2) even with a ``config-2`` vfat attached, and findmnt rejects
``--output TARGET`` as an unrecognised option, which getopt_long does in every util-linux version.
So flamingo never reads a config drive, mounted or not; it falls back to the 169.254.169.254
metadata services, which Ganeti does not provide.

What therefore works is applying its two effective settings on the host, in the guest's root
filesystem: the hostname (``/etc/hostname``) and ``public_keys`` (keyed by Linux user name, as
flamingo reads them) into each user's ``~/.ssh/authorized_keys``.  The config-2 drive is still
written (a fixed flamingo, cloudbase-init or an administrator can use it) together with an fstab
entry mounting it at /mnt/config, ``nofail`` so the guest boots without it.  User-data is not
applied: flamingo could only get it from the drive it cannot find.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from instance_cloudimage.disk.guestfiles import (
    guest_dir,
    read_guest_file,
    split_guest_path,
    stat_guest_entry,
    write_guest_file,
)
from instance_cloudimage.runtime.errors import SeedError

log = logging.getLogger(__name__)

METADATA_PATHS = ("openstack/2012-08-10/meta_data.json", "openstack/latest/meta_data.json")
CONFIG_MOUNT = "mnt/config"
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")
FSTAB_LINE = "LABEL=config-2 /mnt/config vfat ro,nofail,x-systemd.device-timeout=10s 0 0"


def read_metadata(files: Mapping[str, bytes]) -> dict[str, Any]:
    for path in METADATA_PATHS:
        if path in files:
            data = json.loads(files[path])
            if not isinstance(data, dict):
                raise SeedError(f"{path} of the config drive is not a JSON object")
            return data
    raise SeedError("the config drive has no openstack/*/meta_data.json")


def keys_by_user(metadata: Mapping[str, Any]) -> dict[str, list[str]]:
    """``public_keys`` as flamingo reads it: user name → key lines (a value may hold several)."""
    raw = metadata.get("public_keys") or {}
    out: dict[str, list[str]] = {}
    if not isinstance(raw, dict):
        return out
    for user, value in raw.items():
        values = value if isinstance(value, list) else [value]
        lines = [ln.strip() for v in values if isinstance(v, str) for ln in v.splitlines() if ln.strip()]
        if lines:
            out[str(user)] = lines
    return out


MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown


def parse_passwd(text: str) -> dict[str, tuple[int, int, str]]:
    """user → (uid, gid, home) from a guest's /etc/passwd; malformed lines are skipped.

    The file is the image's: a home with '..' or ids chown cannot take are skipped here rather
    than crash the writer.
    """
    users: dict[str, tuple[int, int, str]] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not fields[2].isdigit() or not fields[3].isdigit():
            continue
        uid, gid, home = int(fields[2]), int(fields[3]), fields[5]
        if uid > MAX_ID or gid > MAX_ID or not home.startswith("/") or ".." in home.split("/"):
            continue
        users.setdefault(fields[0], (uid, gid, home))
    return users


def merge_lines(existing: bytes | None, new: list[str]) -> bytes:
    old = existing.decode(errors="replace").splitlines() if existing else []
    have = {ln.strip() for ln in old}
    merged = old + [ln for ln in new if ln not in have]
    return ("\n".join(merged) + "\n").encode()


def install_keys(root_fd: int, users: Mapping[str, tuple[int, int, str]], user: str, keys: list[str]) -> bool:
    if user not in users:
        log.warning("the image has no user %s; its SSH keys are not installed", user)
        return False
    uid, gid, home = users[user]
    try:
        with guest_dir(root_fd, home) as home_fd, \
                guest_dir(home_fd, ".ssh", create=True, uid=uid, gid=gid, shown_below=home) as ssh_fd:
            os.fchown(ssh_fd, uid, gid)
            os.fchmod(ssh_fd, 0o700)
            existing = read_guest_file(ssh_fd, "authorized_keys", shown=f"{home}/.ssh/authorized_keys")
            write_guest_file(ssh_fd, "authorized_keys", merge_lines(existing, keys), uid=uid, gid=gid)
    except SeedError as e:
        log.warning("SSH keys for %s not installed: %s", user, e.message)
        return False
    return True


def add_fstab_entry(root_fd: int) -> None:
    with guest_dir(root_fd, "etc") as etc:
        st = stat_guest_entry(etc, "fstab")
        current = read_guest_file(etc, "fstab", shown="/etc/fstab") or b""
        lines = current.decode(errors="replace").splitlines()
        if any(ln.split()[:1] == ["LABEL=config-2"] for ln in lines if not ln.lstrip().startswith("#")):
            return
        mode = (st.st_mode & 0o7777) if st else 0o644
        write_guest_file(etc, "fstab", merge_lines(current, [FSTAB_LINE]), mode=mode)
    parts = split_guest_path(CONFIG_MOUNT)
    with guest_dir(root_fd, "/".join(parts[:-1]), create=True, mode=0o755) as parent, \
            guest_dir(parent, parts[-1], create=True, mode=0o755, shown_below="/".join(parts[:-1])):
        pass


def apply_flamingo_settings(root: Path, configdrive: Mapping[str, bytes], *, fstab: bool) -> None:
    """Write hostname and public keys from the config drive's meta_data.json into the guest at ``root``.

    Raises SeedError/UnsafeImage when /etc cannot be written safely; a missing user only warns.
    """
    metadata = read_metadata(configdrive)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        hostname = metadata.get("hostname")
        if isinstance(hostname, str) and HOSTNAME_RE.match(hostname):
            with guest_dir(root_fd, "etc") as etc:
                write_guest_file(etc, "hostname", hostname.encode() + b"\n", mode=0o644)
        with guest_dir(root_fd, "etc") as etc:
            passwd = read_guest_file(etc, "passwd", shown="/etc/passwd")
        users = parse_passwd(passwd.decode(errors="replace") if passwd else "")
        installed = [u for u, keys in keys_by_user(metadata).items() if install_keys(root_fd, users, u, keys)]
        if fstab:
            add_fstab_entry(root_fd)
    finally:
        os.close(root_fd)
    log.info("flamingo: hostname%s written into the guest%s", f" and keys for {', '.join(installed)}"
             if installed else "", ", config drive mounted at /mnt/config" if fstab else "")
