"""A guest's account files (passwd, group, shadow, gshadow) edited as text: what useradd, groupadd,
gpasswd -a and chpasswd -e would do inside the guest, done on the host (pure: no files here).

Ids follow the guest's own ``/etc/login.defs`` like useradd: a user gets one more than the
highest id in ``UID_MIN``..``UID_MAX`` (a system user the highest free one in ``SYS_UID_MIN``..
``SYS_UID_MAX``), and its own group the same number when that gid is free.  Lines this module does
not understand are kept as they are; nothing is ever removed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from instance_cloudimage.runtime.errors import SeedError
from instance_cloudimage.seed.flamingoconfig import MAX_ID, NewUser

# shadow-utils' defaults when login.defs does not say.
DEFAULT_DEFS = {"UID_MIN": 1000, "UID_MAX": 60000, "SYS_UID_MIN": 101, "SYS_UID_MAX": 999,
                "GID_MIN": 1000, "GID_MAX": 60000, "SYS_GID_MIN": 101, "SYS_GID_MAX": 999}
USERS_GID = 100  # useradd's GROUP for --no-user-group


def is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '¹' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


def parse_login_defs(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            out[parts[0]] = parts[1]
    return out


def _defs_int(defs: Mapping[str, str], name: str) -> int:
    value = defs.get(name, "")
    return int(value) if is_number(value) and int(value) <= MAX_ID else DEFAULT_DEFS[name]


def home_mode(defs: Mapping[str, str]) -> int:
    """useradd's mode for a new home: HOME_MODE, else 0777 & ~UMASK (UMASK default 022)."""
    for name, invert in (("HOME_MODE", False), ("UMASK", True)):
        value = defs.get(name, "")
        try:
            mode = int(value, 8) & 0o777
        except ValueError:
            continue
        return 0o777 & ~mode if invert else mode
    return 0o755


@dataclass
class Table:
    """One colon-separated file: its lines, found by the first field."""

    lines: list[str]
    width: int  # how many fields a new entry has
    changed: bool = False

    @classmethod
    def parse(cls, text: str | None, width: int) -> Table:
        return cls(text.splitlines() if text else [], width)

    def find(self, name: str) -> int | None:
        for i, line in enumerate(self.lines):
            if line.split(":", 1)[0] == name:
                return i
        return None

    def fields(self, name: str) -> list[str] | None:
        i = self.find(name)
        return None if i is None else self.lines[i].split(":")

    def put(self, fields: list[str]) -> None:
        i = self.find(fields[0])
        line = ":".join(fields)
        if i is None:
            self.lines.append(line)
        elif self.lines[i] != line:
            self.lines[i] = line
        else:
            return
        self.changed = True

    def ids(self) -> set[int]:
        return {int(f[2]) for line in self.lines if len(f := line.split(":")) > 2 and is_number(f[2])}

    def text(self) -> bytes:
        # The guest's bytes come back as they were (Accounts.parse decodes with surrogateescape).
        return ("\n".join(self.lines) + "\n").encode(errors="surrogateescape") if self.lines else b""


@dataclass
class Accounts:
    passwd: Table
    group: Table
    shadow: Table | None  # None: the image has no such file, and gets none
    gshadow: Table | None
    defs: Mapping[str, str] = field(default_factory=dict)
    today: int = field(default_factory=lambda: int(time.time() // 86400))

    @classmethod
    def parse(cls, files: Mapping[str, bytes | None], defs: Mapping[str, str]) -> Accounts:
        def table(name: str, width: int) -> Table | None:
            data = files.get(name)
            return None if data is None else Table.parse(data.decode(errors="surrogateescape"), width)

        return cls(table("passwd", 7) or Table([], 7), table("group", 4) or Table([], 4), table("shadow", 9),
                   table("gshadow", 4), defs)

    def _next_id(self, used: set[int], kind: str, system: bool) -> int:
        lo = _defs_int(self.defs, f"SYS_{kind}_MIN" if system else f"{kind}_MIN")
        hi = _defs_int(self.defs, f"SYS_{kind}_MAX" if system else f"{kind}_MAX")
        if system:
            free = [i for i in range(hi, lo - 1, -1) if i not in used]
            if free:
                return free[0]
        else:
            top = max((i for i in used if lo <= i <= hi), default=lo - 1) + 1
            if top <= hi:
                return top
        raise SeedError(f"the image's /etc/{'passwd' if kind == 'UID' else 'group'} has no free id "
                        f"from {lo} to {hi} (its login.defs)")

    def gid_of(self, name: str) -> int | None:
        f = self.group.fields(name)
        return int(f[2]) if f and len(f) > 2 and is_number(f[2]) else None

    def add_group(self, name: str, *, system: bool = False, gid: int | None = None) -> int:
        """The gid of group ``name``, made if missing (groupadd)."""
        existing = self.gid_of(name)
        if existing is not None:
            return existing
        if gid is None or gid in self.group.ids():
            gid = self._next_id(self.group.ids(), "GID", system)
        self.group.put([name, "x", str(gid), ""])
        if self.gshadow is not None:
            self.gshadow.put([name, "!", "", ""])
        return gid

    def add_member(self, group: str, user: str) -> None:
        """gpasswd -a: ``user`` joins ``group`` (which must exist)."""
        for table, members_at in ((self.group, 3), (self.gshadow, 3)):
            f = table.fields(group) if table is not None else None
            if table is None or f is None:
                continue
            f += [""] * (4 - len(f))
            members = [m for m in f[members_at].split(",") if m]
            if user not in members:
                f[members_at] = ",".join([*members, user])
                table.put(f)

    def add_user(self, u: NewUser) -> bool:
        """useradd (without the home): False when the user exists already (then nothing changes)."""
        if self.passwd.find(u.name) is not None:
            return False
        used = self.passwd.ids()
        if u.uid is not None:
            if u.uid in used:
                raise SeedError("user_data asks for a uid that another user of the image has")
            uid = u.uid
        else:
            uid = self._next_id(used, "UID", u.system)
        if u.primary_group:
            gid = self.add_group(u.primary_group, system=u.system)
        elif u.user_group:
            gid = self.add_group(u.name, system=u.system, gid=uid if self.gid_of(u.name) is None else None)
        else:
            gid = self.gid_of("users") or USERS_GID
        for g in u.groups:
            self.add_group(g)
            self.add_member(g, u.name)
        home = u.homedir or f"/home/{u.name}"
        shell = u.shell or self.defs.get("SHELL", "/bin/bash")
        self.passwd.put([u.name, "x", str(uid), str(gid), u.gecos, home, shell])
        if self.shadow is not None:
            self.shadow.put([u.name, "!", str(self.today), "0", "99999", "7", "", "", ""])
        return True

    def set_password(self, name: str, hashed: str | None, *, lock: bool) -> None:
        """chpasswd -e with ``hashed`` (if any), then passwd -l when ``lock`` (a '!' in front)."""
        table = self.shadow
        if table is None:
            raise SeedError("the image has no /etc/shadow, so a password cannot be set")
        f = table.fields(name)
        if f is None:
            if self.passwd.find(name) is None:
                raise SeedError(f"the image has no user {name} to set the password of")
            f = [name, "!", "", "0", "99999", "7", "", "", ""]
        f += [""] * (9 - len(f))
        current = f[1]
        if hashed is not None:
            current, f[2] = hashed, str(self.today)
        if lock and not current.startswith("!"):
            current = "!" + current
        f[1] = current
        table.put(f)

    def user(self, name: str) -> tuple[int, int, str] | None:
        """(uid, gid, home) of ``name``."""
        f = self.passwd.fields(name)
        if not f or len(f) < 7 or not is_number(f[2]) or not is_number(f[3]):
            return None
        return int(f[2]), int(f[3]), f[5]
