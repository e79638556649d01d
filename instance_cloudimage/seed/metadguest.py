#!/usr/bin/python3
"""Ganeti metad's live OS parameters, applied in the guest at every boot (instance-cloudimage).

This file runs in the GUEST, not on the node: the seed installs its source as
/usr/local/lib/instance-cloudimage/metad-refresh, run by cloudimage-metad.service after the
network is up (seed/metad.py).  It fetches http://169.254.169.254/ganeti/latest/os/parameters.json
over Ganeti's instance-communication NIC and applies two parameters when they differ from what
the seed set (recorded in /etc/instance-cloudimage/metad.json):

- ``ssh_authorized_keys``: the default user's ``~/.ssh/authorized_keys`` gets the new keys; the
  keys the seed (or an earlier run) put there go, lines anyone else added stay;
- ``hostname``: ``/etc/hostname``, the running host name and the ``127.0.1.1`` line of /etc/hosts.

A 404 (metad does not know the instance: after a metad restart or a failover, until the next
``gnt-instance modify``), a timeout or a missing NIC is logged and changes nothing.  Standard
library only, Python 3.7 or later: it must run on Debian, Ubuntu and the RHEL family as they come.
It never prints a parameter's value: parameters.json also carries the secret ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

URL = "http://169.254.169.254/ganeti/latest/os/parameters.json"
CONFIG = "etc/instance-cloudimage/metad.json"
STATE = "var/lib/instance-cloudimage/metad-keys"
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})*$")
MAX_REPLY = 1 << 20


def log(message: str) -> None:
    print(f"cloudimage-metad: {message}", file=sys.stderr, flush=True)


def fetch(url: str, attempts: int, timeout: float, pause: float) -> dict[str, Any] | None:
    """The parameters metad serves for this guest, or None (logged) when there are none to apply."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # metad is on-link, never proxied
    for attempt in range(1, attempts + 1):
        try:
            with opener.open(url, timeout=timeout) as reply:
                data = json.loads(reply.read(MAX_REPLY))
        except urllib.error.HTTPError as e:
            if e.code == 404:
                log("metad does not know this instance (404: it restarted or the instance failed over, and "
                    "has had no gnt-instance modify since); the guest is left as it is")
                return None
            log(f"metad answered HTTP {e.code} (attempt {attempt} of {attempts})")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            log(f"metad cannot be reached ({reason}; is the communication NIC up?) (attempt {attempt} of "
                f"{attempts})")
        except ValueError:
            log("metad's reply is not JSON; the guest is left as it is")
            return None
        else:
            if isinstance(data, dict):
                return data
            log("metad's reply is not a JSON object; the guest is left as it is")
            return None
        if attempt < attempts:
            time.sleep(pause)
    log("giving up; the guest is left as it is")
    return None


def parameter(params: dict[str, Any], name: str) -> str | None:
    """metad's ``{"name": ["value", "public"|"private"|"secret"]}``: the value, or None."""
    entry = params.get(name)
    if isinstance(entry, list) and entry and isinstance(entry[0], str):
        return entry[0]
    return None


def split_keys(value: str) -> list[str]:
    """The ssh_authorized_keys parameter's entries, as the provider reads them."""
    entries = (" ".join(e.split()) for e in re.split(r"[;\r\n]+", value))
    out: list[str] = []
    for e in entries:
        if e and not e.startswith("#") and e not in out:
            out.append(e)
    return out


def write_file(path: str, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Replace ``path`` atomically; a link or other entry planted there is replaced, not followed."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.cloudimage-new")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def find_user(root: str, name: str | None, seed_keys: list[str]) -> tuple[str, int, int, str] | None:
    """(name, uid, gid, home) of the default user: the one named, else the first user whose
    authorized_keys holds a key the seed gave (cloud-init gives them to the distribution's default user)."""
    for line in read_lines(os.path.join(root, "etc/passwd")):
        f = line.split(":")
        if len(f) < 7 or not re.fullmatch("[0-9]+", f[2]) or not re.fullmatch("[0-9]+", f[3]) or \
                not f[5].startswith("/"):
            continue
        if name is not None and f[0] != name:
            continue
        if name is None:
            path = os.path.join(root, f[5].lstrip("/"), ".ssh/authorized_keys")
            keys = {" ".join(k.split()) for k in read_lines(path)}
            if int(f[2]) == 0 or not keys & set(seed_keys):
                continue
        return f[0], int(f[2]), int(f[3]), f[5]
    return None


def apply_keys(root: str, config: dict[str, Any], keys: list[str]) -> None:
    seed_keys = [k for k in config.get("ssh_authorized_keys", []) if isinstance(k, str)]
    state = os.path.join(root, STATE)
    applied = read_lines(state) if os.path.exists(state) else None
    if keys == (seed_keys if applied is None else applied):
        return
    user = find_user(root, config.get("user") if isinstance(config.get("user"), str) else None, seed_keys)
    if user is None:
        log("the default user is not known (no DefaultUser and no seed key found); ssh_authorized_keys not applied")
        return
    name, uid, gid, home = user
    ssh = os.path.join(root, home.lstrip("/"), ".ssh")
    if not os.path.isdir(ssh) or os.path.islink(ssh):
        if os.path.lexists(ssh):
            log(f"{home}/.ssh is not a directory; ssh_authorized_keys not applied")
            return
        os.mkdir(ssh, 0o700)
        os.chown(ssh, uid, gid)
    path = os.path.join(ssh, "authorized_keys")
    managed = set(seed_keys) | set(applied or [])
    kept = [ln for ln in read_lines(path) if " ".join(ln.split()) not in managed]
    write_file(path, ("\n".join(kept + keys) + "\n").encode(), 0o600, uid, gid)
    os.makedirs(os.path.dirname(state), mode=0o700, exist_ok=True)
    write_file(state, ("\n".join(keys) + "\n").encode(), 0o600)
    log(f"applied {len(keys)} SSH key(s) from metad for {name}")


def apply_hostname(root: str, config: dict[str, Any], fqdn: str, live: bool) -> None:
    if fqdn == config.get("hostname"):
        return
    if not HOSTNAME_RE.match(fqdn) or fqdn.rsplit(".", 1)[-1].isdigit():
        log("metad's hostname is not a valid host name; not applied")
        return
    short = fqdn.split(".")[0]
    hostname_file = os.path.join(root, "etc/hostname")
    if read_lines(hostname_file) == [short]:
        return
    write_file(hostname_file, (short + "\n").encode(), 0o644)
    hosts = os.path.join(root, "etc/hosts")
    lines = read_lines(hosts)
    names = f"{fqdn} {short}" if fqdn != short else short
    new = [f"127.0.1.1 {names}" if ln.split()[:1] == ["127.0.1.1"] else ln for ln in lines]
    if new != lines:
        write_file(hosts, ("\n".join(new) + "\n").encode(), 0o644)
    if live:
        socket.sethostname(short)
    log("applied the host name from metad")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--root", default="/", help="the guest's root (a scratch tree in tests)")
    ap.add_argument("--url", default=URL)
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds per attempt")
    args = ap.parse_args(argv)
    try:
        with open(os.path.join(args.root, CONFIG), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        log(f"cannot read /{CONFIG} ({e}); nothing to compare with, nothing applied")
        return 0
    params = fetch(args.url, args.attempts, args.timeout, pause=2.0)
    if params is None:
        return 0
    keys = parameter(params, "ssh_authorized_keys")
    if keys is not None and split_keys(keys):
        apply_keys(args.root, config, split_keys(keys))
    hostname = parameter(params, "hostname")
    if hostname:
        apply_hostname(args.root, config, hostname.strip(), live=os.path.realpath(args.root) == "/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
