"""Properties of flamingo's hand-written parts on hostile input.

``parse_cloud_config`` (a user's cloud-config, any YAML data) returns a FlamingoConfig or raises
ParameterError; whatever it accepts renders into account lines without a stray ':' or newline.
``Accounts`` (the image's passwd/group/shadow/gshadow, any text) either takes the changes or
raises SeedError, and never drops or rewrites a line it was not asked to change.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from instance_cloudimage.runtime.errors import ParameterError, SeedError
from instance_cloudimage.seed.accounts import Accounts, Table
from instance_cloudimage.seed.flamingoconfig import TOP_KEYS, NewUser, parse_cloud_config

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**40), st.text(max_size=30),
                    st.sampled_from(["alice", "0644", "b64", "gz+b64", "/etc/x", "root:root", "a,b", "default"]))
yaml_data: Any = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(
        ["name", "groups", "path", "content", "encoding", "owner", "permissions", "uid", "sudo", "homedir",
         "ssh_authorized_keys", "hashed_passwd", "system", "append"])), inner, max_size=4)), max_leaves=12)


@given(st.dictionaries(st.sampled_from(TOP_KEYS), yaml_data, max_size=5))
def test_any_cloud_config_is_parsed_or_refused(cfg: dict[str, Any]) -> None:
    try:
        parsed = parse_cloud_config(cfg)
    except ParameterError:
        return
    for u in parsed.users:
        for field in (u.name, u.gecos, u.homedir or "", u.shell or "", *u.groups):
            assert ":" not in field and "\n" not in field
    for f in parsed.files:
        assert f.path.startswith("/") and ".." not in f.path.split("/") and 0 <= f.mode <= 0o7777


guest_text = st.one_of(st.none(), st.text(max_size=300), st.lists(st.lists(st.text(
    alphabet=st.characters(blacklist_characters=":\n\r"), max_size=8), min_size=1, max_size=9).map(":".join),
    max_size=8).map("\n".join))


@given(guest_text, guest_text, guest_text, guest_text, st.dictionaries(st.sampled_from(
    ["UID_MIN", "UID_MAX", "SYS_UID_MIN", "SYS_UID_MAX", "GID_MIN", "GID_MAX", "HOME_MODE", "UMASK"]),
    st.text(max_size=8), max_size=4))
def test_any_account_files_take_a_user_or_refuse(passwd: str | None, group: str | None, shadow: str | None,
                                                 gshadow: str | None, defs: dict[str, str]) -> None:
    files = {"passwd": passwd, "group": group, "shadow": shadow, "gshadow": gshadow}
    raw = {k: None if v is None else v.encode("utf-8", "surrogatepass") for k, v in files.items()}
    accounts = Accounts.parse(raw, defs)
    before = {name: list(t.lines) for name in files if isinstance(t := getattr(accounts, name), Table)}
    try:
        accounts.add_group("admins")
        accounts.add_user(NewUser("alice", groups=("admins", "wheel")))
        accounts.add_member("admins", "alice")
        accounts.set_password("alice", "$y$x", lock=False)
    except SeedError:
        return
    for name, lines in before.items():
        table = getattr(accounts, name)
        kept = [ln for ln in table.lines if ln.split(":", 1)[0] not in ("alice", "admins", "wheel")]
        assert kept == [ln for ln in lines if ln.split(":", 1)[0] not in ("alice", "admins", "wheel")]


def test_account_files_that_are_not_utf8_keep_their_bytes() -> None:
    """A guest's passwd need not be UTF-8 (a Latin-1 gecos): a new user is added, and the other
    lines are written back byte for byte, not refused with a traceback."""
    passwd, group = b"root:x:0:0:r\xe9my:/root:/bin/sh\n", b"root:x:0:\nstaff:x:50:r\xe9my\n"
    accounts = Accounts.parse({"passwd": passwd, "group": group, "shadow": None, "gshadow": None}, {})
    accounts.add_user(NewUser("alice", groups=("staff",)))
    written_passwd, written_group = accounts.passwd.text(), accounts.group.text()
    assert written_passwd.startswith(passwd) and b"\nalice:" in written_passwd
    assert written_group.startswith(b"root:x:0:\nstaff:x:50:r\xe9my,alice\n")
