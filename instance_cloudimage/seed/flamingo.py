"""Making a flamingo image boot configured: everything flamingo would apply, applied on the host.

flamingo (tmrts/flamingo) looks for a config drive with
``blkid "-t LABEL='config-2'" -odevice`` and ``findmnt ... "--output TARGET"``, each passing an
option and its value as ONE argument.  Measured on this node (util-linux 2.38): that blkid call
finds nothing (exit 2) even with a ``config-2`` vfat attached, and findmnt rejects
``--output TARGET`` as an unrecognised option, which getopt_long does in every util-linux version.
So flamingo never reads a config drive, mounted or not; it falls back to the 169.254.169.254
metadata services, which Ganeti does not provide.

So the host writes into the guest's root filesystem what flamingo would have done with the drive:
the hostname (``/etc/hostname``), ``public_keys`` (keyed by Linux user name, as flamingo reads
them), ``password_hash`` into ``/etc/shadow``, and the user-data's cloud-config subset
(seed/flamingoconfig.py): groups and users (seed/accounts.py, homes from the guest's /etc/skel),
``write_files`` (owners looked up in the guest's own passwd and group), ``ssh_authorized_keys``;
``runcmd`` and a ``#!`` script get a first-boot unit (seed/firstboot.py).  Every path is reached
through disk/guestfiles.py: a symlink anywhere on the way is refused, never followed.

The config-2 drive is still written (cloudbase-init-style tools or an administrator can read it),
but not mounted: a flamingo fixed to find it would apply its user-data again at every boot, on
top of what the host did.
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
    copy_guest_tree,
    guest_dir,
    read_guest_file,
    split_guest_path,
    stat_guest_entry,
    write_guest_file,
)
from instance_cloudimage.runtime.errors import SeedError, UnsafeImage
from instance_cloudimage.seed.accounts import Accounts, home_mode, is_number, parse_login_defs
from instance_cloudimage.seed.content import SeedInput
from instance_cloudimage.seed.firstboot import install_first_boot
from instance_cloudimage.seed.flamingoconfig import MAX_ID, FlamingoConfig, parse_flamingo_user_data
from instance_cloudimage.seed.userdata import MAX_DECODED

log = logging.getLogger(__name__)

METADATA_PATHS = ("openstack/2012-08-10/meta_data.json", "openstack/latest/meta_data.json")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")


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


def parse_passwd(text: str) -> dict[str, tuple[int, int, str]]:
    """user → (uid, gid, home) from a guest's /etc/passwd; malformed lines are skipped.

    The file is the image's: a home with '..' or ids chown cannot take are skipped here rather
    than crash the writer.
    """
    users: dict[str, tuple[int, int, str]] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or not is_number(fields[2]) or not is_number(fields[3]):
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


ACCOUNT_FILES = ("passwd", "group", "shadow", "gshadow")
SUDOERS_DIR = "etc/sudoers.d"
SUDOERS_FILE = "90-cloud-init-users"  # cloud-init's name, so either tool's rules land in one place


def read_accounts(etc: int) -> Accounts:
    files = {name: read_guest_file(etc, name, shown=f"/etc/{name}") for name in ACCOUNT_FILES}
    defs = read_guest_file(etc, "login.defs", shown="/etc/login.defs")
    return Accounts.parse(files, parse_login_defs(defs.decode(errors="replace") if defs else ""))


def write_accounts(etc: int, accounts: Accounts) -> None:
    """Write back the account files that changed, keeping each one's mode and owner (shadow is
    0000 or 0640 root:shadow, and must stay so)."""
    for name in ACCOUNT_FILES:
        table = getattr(accounts, name)
        if table is None or not table.changed:
            continue
        st = stat_guest_entry(etc, name)
        mode, uid, gid = (st.st_mode & 0o7777, st.st_uid, st.st_gid) if st else (0o644, 0, 0)
        write_guest_file(etc, name, table.text(), mode=mode, uid=uid, gid=gid)


def edit_accounts(accounts: Accounts, cfg: FlamingoConfig, inp: SeedInput) -> list[str]:
    """groups, users, memberships and passwords, in flamingo's order; the users created."""
    for name, _ in cfg.groups:
        accounts.add_group(name)
    created = [u.name for u in cfg.users if accounts.add_user(u)]
    for u in cfg.users:
        if u.name not in created:
            log.info("flamingo: users[%d] exists in the image; only its password, lock, keys and sudo rules "
                     "are applied", cfg.users.index(u))
        if u.hashed_passwd is not None or u.lock_passwd:
            accounts.set_password(u.name, u.hashed_passwd, lock=u.lock_passwd)
    for group, members in cfg.groups:
        for member in members:
            if accounts.user(member) is None:
                raise SeedError("user_data: groups lists a member that is neither in the image nor in users")
            accounts.add_member(group, member)
    if inp.password_hash:
        accounts.set_password(inp.default_user or "root", inp.password_hash, lock=False)
    return created


def make_home(root_fd: int, home: str, uid: int, gid: int, mode: int) -> None:
    """useradd -m: the home from /etc/skel, unless it exists (then it is left as it is)."""
    parts = split_guest_path(home)
    parent = "/".join(parts[:-1])
    with guest_dir(root_fd, parent, create=True, mode=0o755) as parent_fd:
        if stat_guest_entry(parent_fd, parts[-1]) is not None:
            log.info("flamingo: a new user's home exists in the image already; not copying /etc/skel into it")
            return
        with guest_dir(root_fd, "etc") as etc:
            has_skel = stat_guest_entry(etc, "skel") is not None  # without one, useradd makes an empty home
        with guest_dir(parent_fd, parts[-1], create=True, mode=mode, uid=uid, gid=gid, shown_below=parent) as h:
            if has_skel:
                with guest_dir(root_fd, "etc/skel") as skel:
                    copy_guest_tree(skel, h, uid=uid, gid=gid, shown="/etc/skel")


def write_sudo_rules(root_fd: int, cfg: FlamingoConfig) -> None:
    rules = [(u.name, r) for u in cfg.users for r in u.sudo]
    if not rules:
        return
    text = "# Created by instance-cloudimage from the instance's user-data\n" + "".join(
        f"\n# User rules for {name}\n{name} {rule}\n" for name, rule in rules)
    with guest_dir(root_fd, SUDOERS_DIR, create=True, mode=0o750) as d:
        existing = read_guest_file(d, SUDOERS_FILE, shown=f"/{SUDOERS_DIR}/{SUDOERS_FILE}")
        data = (existing + b"\n" if existing else b"") + text.encode()
        write_guest_file(d, SUDOERS_FILE, data, mode=0o440)


def write_user_files(root_fd: int, cfg: FlamingoConfig, accounts: Accounts) -> None:
    for i, f in enumerate(cfg.files):
        owner, gid = accounts.user(f.owner), accounts.gid_of(f.group)
        if owner is None or gid is None:
            raise SeedError(f"user_data: write_files[{i}].owner is not a user and group of the image",
                            "create them in users/groups of the same user-data")
        parts = split_guest_path(f.path)
        try:
            with guest_dir(root_fd, "/".join(parts[:-1]), create=True, mode=0o755) as d:
                old = read_guest_file(d, parts[-1], limit=MAX_DECODED, shown=f.path) if f.append else None
                write_guest_file(d, parts[-1], (old or b"") + f.content, mode=f.mode, uid=owner[0], gid=gid)
        except UnsafeImage:
            # Security: the guest_files messages name the path, which is part of the secret user_data.
            raise UnsafeImage(f"user_data: write_files[{i}].path leads through a symbolic link or a "
                              "non-directory in the image; refusing to follow it",
                              "write below a real directory (on a merged-/usr image, /usr/lib rather than "
                              "/lib)") from None
        except SeedError:
            raise SeedError(f"user_data: write_files[{i}] cannot be written into the image",
                            "check its path against the image's directories") from None


def apply_user_config(root_fd: int, inp: SeedInput, metadata: Mapping[str, Any]) -> str:
    """Accounts, keys, sudo rules, files and the first-boot unit; a summary for the log."""
    cfg = parse_flamingo_user_data(inp.user_data)
    with guest_dir(root_fd, "etc") as etc:
        accounts = read_accounts(etc)
        created = edit_accounts(accounts, cfg, inp)
        write_accounts(etc, accounts)
    users = parse_passwd("\n".join(accounts.passwd.lines))  # the passwd just written, not re-encoded
    for name in created:
        u = next(u for u in cfg.users if u.name == name)
        if name in users and u.create_home and not u.system:
            uid, gid, home = users[name]
            make_home(root_fd, home, uid, gid, home_mode(accounts.defs))
    keys = keys_by_user(metadata)
    keys.setdefault("root", []).extend(cfg.root_keys)
    for u in cfg.users:
        keys.setdefault(u.name, []).extend(u.ssh_keys)
    installed = [u for u, k in keys.items() if k and install_keys(root_fd, users, u, k)]
    write_sudo_rules(root_fd, cfg)
    write_user_files(root_fd, cfg, accounts)
    first_boot = install_first_boot(root_fd, cfg, inp.instance_id)
    return (f"keys for {len(installed)} user(s), {len(cfg.groups)} group(s), {len(created)} new user(s), "
            f"{len(cfg.files)} file(s){', password' if inp.password_hash else ''}"
            f"{', a first-boot unit for the user-data commands' if first_boot else ''}")


def request_relabel(root_fd: int) -> bool:
    """``/.autorelabel`` when the guest runs SELinux: files written from the host carry no label,
    and an enforcing guest would deny sshd its users' authorized_keys.  The guest relabels itself
    at first boot (one extra reboot), as after virt-customize --selinux-relabel."""
    with guest_dir(root_fd, "etc") as etc:
        try:
            with guest_dir(etc, "selinux", shown_below="etc") as d:
                config = read_guest_file(d, "config", shown="/etc/selinux/config") or b""
        except SeedError:  # no /etc/selinux: no SELinux
            return False
    modes = {ln.split(b"=", 1)[1].strip() for ln in config.splitlines() if ln.strip().startswith(b"SELINUX=")}
    if not modes & {b"enforcing", b"permissive"}:
        return False
    write_guest_file(root_fd, ".autorelabel", b"", mode=0o644)
    return True


def apply_flamingo_settings(root: Path, configdrive: Mapping[str, bytes], inp: SeedInput) -> None:
    """Apply the host name, keys and user-data of ``inp`` into the guest mounted at ``root``.

    Raises SeedError/UnsafeImage when the guest cannot be written safely, ParameterError for
    user-data a flamingo variant cannot take; a user missing for meta_data's keys only warns.
    """
    metadata = read_metadata(configdrive)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        hostname = metadata.get("hostname")
        if isinstance(hostname, str) and HOSTNAME_RE.match(hostname):
            with guest_dir(root_fd, "etc") as etc:
                write_guest_file(etc, "hostname", hostname.encode() + b"\n", mode=0o644)
        summary = apply_user_config(root_fd, inp, metadata)
        if request_relabel(root_fd):
            summary += ", an SELinux relabel at first boot"
    finally:
        os.close(root_fd)
    log.info("flamingo: wrote into the guest: hostname, %s", summary)
