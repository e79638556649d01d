"""Flamingo's cloud-config subset, as data: what a flamingo variant's user-data asks for, validated.

Flamingo (tmrts/flamingo, ``pkg/datasrc/userdata/cloudconfig``) reads ``ssh_authorized_keys``
(for root), ``runcmd``, ``users``, ``groups`` and ``write_files``; the provider applies them on
the host instead (seed/flamingo.py), so this module accepts exactly those keys, with cloud-init's
spelling of their fields (what a cloud-config author writes), and refuses every other key with one
line naming it: nothing accepted is silently dropped.  ``verify`` and ``create`` share it through
content.check_variant_parameters / seed_input.

Security: user-data is secret.  Messages name a key or an entry's position, never a value.
"""

from __future__ import annotations

import base64
import binascii
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.seed.sshkeys import parse_key
from instance_cloudimage.seed.userdata import MAX_DECODED, Kind, UserData, gunzip_bounded
from instance_cloudimage.seed.values import parse_password_hash

TOP_KEYS = ("groups", "runcmd", "ssh_authorized_keys", "users", "write_files")
USER_KEYS = ("name", "gecos", "homedir", "shell", "primary_group", "groups", "uid", "system", "no_create_home",
             "no_user_group", "passwd", "hashed_passwd", "lock_passwd", "ssh_authorized_keys", "sudo")
FILE_KEYS = ("path", "content", "encoding", "owner", "permissions", "append", "defer")
ENCODINGS = {"text/plain": (), "b64": ("b64",), "base64": ("b64",), "gz": ("gz",), "gzip": ("gz",),
             "gz+b64": ("b64", "gz"), "gzip+b64": ("b64", "gz"), "gz+base64": ("b64", "gz"),
             "gzip+base64": ("b64", "gz")}
# useradd's default NAME_REGEX, with a length cap: nothing that could break a passwd line.
NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
# A field of passwd and a path: no separator, no line break, no control character.
FIELD_RE = re.compile(r"^[^:\x00-\x1f\x7f]*$")


def _fail(where: str, why: str, hint: str | None = None) -> ParameterError:
    return ParameterError(f"user_data: {where} {why}", hint)


def _shown(key: object) -> str:
    """A key as a message may show it (short, printable)."""
    text = str(key)
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


@dataclass(frozen=True)
class NewUser:
    name: str
    gecos: str = ""
    homedir: str | None = None
    shell: str | None = None
    primary_group: str | None = None
    groups: tuple[str, ...] = ()
    uid: int | None = None
    system: bool = False
    create_home: bool = True
    user_group: bool = True
    hashed_passwd: str | None = None
    lock_passwd: bool = True
    ssh_keys: tuple[str, ...] = ()
    sudo: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestFile:
    path: str
    content: bytes
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    append: bool = False


@dataclass(frozen=True)
class FlamingoConfig:
    """What the host applies into a flamingo guest (besides the host name and meta_data keys)."""

    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    users: tuple[NewUser, ...] = ()
    files: tuple[GuestFile, ...] = ()
    root_keys: tuple[str, ...] = ()
    runcmd: str | None = None  # the runcmd list as one sh script, as cloud-init renders it
    script: str | None = None  # a #! user-data script, run by its own interpreter

    @property
    def first_boot(self) -> bool:
        return self.runcmd is not None or self.script is not None


def _name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _fail(where, "is not a valid user or group name", "lower-case letters, digits, '_' and '-'")
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, "must be true or false")
    return value


def _field(where: str, value: Any, *, path: bool = False) -> str:
    if not isinstance(value, str) or not FIELD_RE.match(value):
        raise _fail(where, "must be text without ':' or control characters")
    if path and (not value.startswith("/") or ".." in value.split("/") or not value.strip("/")):
        raise _fail(where, "must be an absolute path without '..', below /")
    return value


def _keys(where: str, value: Any) -> tuple[str, ...]:
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise _fail(where, "must be a list of OpenSSH public keys")
    out = []
    for i, entry in enumerate(entries, 1):
        try:
            out.append(parse_key(i, entry).line)
        except ParameterError as e:
            raise ParameterError(f"user_data: {where}{e.message.removeprefix('ssh_authorized_keys:')}",
                                 e.hint) from None
    return tuple(out)


def _names(where: str, value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _fail(where, "must be a list of names or a comma-separated string")
    return tuple(_name(where, i.strip() if isinstance(i, str) else i) for i in items)


def _hash(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(where, "must be a crypt(3) hash")
    try:
        return parse_password_hash(value)
    except ParameterError:
        raise _fail(where, "is not a crypt(3) hash such as $y$..., $6$... (MD5 and DES are refused)",
                    "make one with: mkpasswd -m yescrypt") from None


def _id(where: str, value: Any) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
        raise _fail(where, f"must be a number from 0 to {MAX_ID}")
    return value


def _sudo(where: str, value: Any) -> tuple[str, ...]:
    if value is None or value is False:
        return ()
    rules = [value] if isinstance(value, str) else value
    if not isinstance(rules, list) or not all(isinstance(r, str) and r.strip() and "\n" not in r for r in rules):
        raise _fail(where, "must be a sudoers rule or a list of them, one line each")
    return tuple(r.strip() for r in rules)


def parse_user(index: int, entry: Any) -> NewUser | None:
    """One ``users`` entry: a name, ``default`` (the image's own user, kept: None), or a mapping."""
    where = f"users[{index}]"
    if entry == "default":
        return None
    if isinstance(entry, str):
        return NewUser(_name(where, entry))
    if not isinstance(entry, dict):
        raise _fail(where, "must be a user name or a mapping with 'name'")
    for key in entry:
        if str(key).replace("-", "_") not in USER_KEYS:
            raise _fail(where, f"has key {_shown(key)}, which flamingo variants do not support",
                        f"supported: {', '.join(USER_KEYS)}")
    u = {str(k).replace("-", "_"): v for k, v in entry.items()}
    if "name" not in u:
        raise _fail(where, "has no 'name'")
    passwd = u.get("hashed_passwd", u.get("passwd"))
    return NewUser(
        name=_name(f"{where}.name", u["name"]),
        gecos=_field(f"{where}.gecos", u.get("gecos", "")),
        homedir=_field(f"{where}.homedir", u["homedir"], path=True) if u.get("homedir") else None,
        shell=_field(f"{where}.shell", u["shell"], path=True) if u.get("shell") else None,
        primary_group=_name(f"{where}.primary_group", u["primary_group"]) if u.get("primary_group") else None,
        groups=_names(f"{where}.groups", u["groups"]) if u.get("groups") else (),
        uid=_id(f"{where}.uid", u["uid"]) if u.get("uid") is not None else None,
        system=_bool(f"{where}.system", u.get("system", False)),
        create_home=not _bool(f"{where}.no_create_home", u.get("no_create_home", False)),
        user_group=not _bool(f"{where}.no_user_group", u.get("no_user_group", False)),
        hashed_passwd=_hash(f"{where}.hashed_passwd", passwd) if passwd else None,
        lock_passwd=_bool(f"{where}.lock_passwd", u.get("lock_passwd", True)),
        ssh_keys=_keys(f"{where}.ssh_authorized_keys", u["ssh_authorized_keys"]) if u.get("ssh_authorized_keys")
        else (),
        sudo=_sudo(f"{where}.sudo", u.get("sudo")),
    )


def parse_groups(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``groups``: names, or ``{name: [members]}`` mappings (cloud-init also takes a comma string)."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise _fail("groups", "must be a list of group names or {name: [members]} mappings")
    out: list[tuple[str, tuple[str, ...]]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append((_name(f"groups[{i}]", item.strip()), ()))
        elif isinstance(item, dict):
            for name, members in item.items():
                out.append((_name(f"groups[{i}]", name),
                            _names(f"groups[{i}] members", members) if members else ()))
        else:
            raise _fail(f"groups[{i}]", "must be a group name or a {name: [members]} mapping")
    return tuple(out)


def decode_content(where: str, content: Any, encoding: Any) -> bytes:
    if not isinstance(content, str):
        raise _fail(f"{where}.content", "must be text")
    steps = ENCODINGS.get(str(encoding).lower().strip()) if encoding is not None else ()
    if steps is None:
        raise _fail(f"{where}.encoding", "is not one of " + ", ".join(ENCODINGS))
    data = content.encode("utf-8", "surrogateescape")
    for step in steps:
        if step == "b64":
            try:
                data = base64.b64decode(b"".join(data.split()), validate=True)
            except (binascii.Error, ValueError):
                raise _fail(f"{where}.content", "is not valid base64") from None
        else:
            data = gunzip_bounded(data, f"user_data: {where}.content")
    if len(data) > MAX_DECODED:
        raise _fail(f"{where}.content", f"is larger than {MAX_DECODED // 1024} KiB")
    return data


def parse_mode(where: str, value: Any) -> int:
    """cloud-init's ``permissions``: an octal string ('0644', '644', '0o644') or a YAML integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,4}", value.strip()):
        mode = int(value.strip().removeprefix("0o"), 8)
    else:
        raise _fail(f"{where}.permissions", "must be an octal mode such as '0644'")
    if not 0 <= mode <= 0o7777:
        raise _fail(f"{where}.permissions", "must be an octal mode such as '0644'")
    return mode


def parse_file(index: int, entry: Any) -> GuestFile:
    where = f"write_files[{index}]"
    if not isinstance(entry, dict):
        raise _fail(where, "must be a mapping with 'path'")
    for key in entry:
        if key not in FILE_KEYS:
            raise _fail(where, f"has key {_shown(key)}, which flamingo variants do not support",
                        f"supported: {', '.join(FILE_KEYS)}")
    if "path" not in entry:
        raise _fail(where, "has no 'path'")
    path = _field(f"{where}.path", entry["path"], path=True)
    if path.endswith("/"):  # _field refused a path that is only "/"
        raise _fail(f"{where}.path", "must name a file")
    owner = entry.get("owner") or "root:root"
    if not isinstance(owner, str):
        raise _fail(f"{where}.owner", "must be 'user' or 'user:group'")
    user, _, group = owner.partition(":")
    _bool(f"{where}.defer", entry.get("defer", False))  # always after users and groups exist
    return GuestFile(path, decode_content(where, entry.get("content", ""), entry.get("encoding")),
                     parse_mode(where, entry.get("permissions", "0644")), _name(f"{where}.owner", user),
                     _name(f"{where}.owner", group or user), _bool(f"{where}.append", entry.get("append", False)))


def render_runcmd(value: Any) -> str:
    """``runcmd`` as the sh script cloud-init's ``shellify`` writes: a list is one argv (quoted),
    a string one shell line."""
    if not isinstance(value, list):
        raise _fail("runcmd", "must be a list of commands")
    lines = ["#!/bin/sh"]
    for i, cmd in enumerate(value):
        if isinstance(cmd, list) and cmd and all(isinstance(a, str | int | float) for a in cmd):
            lines.append(" ".join(shlex.quote(str(a)) for a in cmd))
        elif isinstance(cmd, str) and cmd.strip():
            lines.append(cmd)
        else:
            raise _fail(f"runcmd[{i}]", "must be a shell line or a list of arguments")
    return "\n".join(lines) + "\n"


def parse_cloud_config(cfg: Mapping[str, Any]) -> FlamingoConfig:
    for key in cfg:
        if key not in TOP_KEYS:
            raise _fail(f"key {_shown(key)}", "is not supported for flamingo variants",
                        f"flamingo reads only {', '.join(TOP_KEYS)}")
    users = tuple(u for i, e in enumerate(_list("users", cfg.get("users") or [])) if (u := parse_user(i, e)))
    files = tuple(parse_file(i, e) for i, e in enumerate(_list("write_files", cfg.get("write_files") or [])))
    return FlamingoConfig(
        groups=parse_groups(cfg["groups"]) if cfg.get("groups") else (),
        users=users,
        files=files,
        root_keys=_keys("ssh_authorized_keys", cfg["ssh_authorized_keys"]) if cfg.get("ssh_authorized_keys")
        else (),
        runcmd=render_runcmd(cfg["runcmd"]) if cfg.get("runcmd") else None,
    )


def _list(key: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise _fail(key, "must be a list")
    return value


def parse_flamingo_user_data(user: UserData | None) -> FlamingoConfig:
    """What the host applies for this user-data.  Raises ParameterError (one line naming the key)."""
    if user is None:
        return FlamingoConfig()
    if user.kind is Kind.SCRIPT:
        return FlamingoConfig(script=user.text)
    if user.kind is Kind.CLOUD_CONFIG:
        return parse_cloud_config(user.config or {})
    raise ParameterError(f"user_data is {user.kind.value}, which flamingo variants do not read",
                         "give a #cloud-config or a #! script")
