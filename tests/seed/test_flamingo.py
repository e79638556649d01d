"""flamingo: everything it would apply, applied on the host into a CentOS-like guest tree.

The tree is what a CentOS/Rocky cloud image has (passwd/group/shadow/gshadow with their modes,
login.defs, /etc/skel); each file is checked whole after the host applied hostname, keys,
password_hash and the user-data's cloud-config subset.  The same tree on a real ext4 disk goes
through create, rename and import in tests/seed/test_flamingo_lifecycle.py.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.runtime.errors import ParameterError, SeedError, UnsafeImage
from instance_cloudimage.runtime.siteconfig import Paths
from instance_cloudimage.seed.configdrive import build_configdrive
from instance_cloudimage.seed.content import SeedInput, check_variant_parameters, seed_input
from instance_cloudimage.seed.firstboot import RUNNER
from instance_cloudimage.seed.flamingo import apply_flamingo_settings, parse_passwd
from instance_cloudimage.verbs.verify import run_verify
from tests.support import delivery_helpers as dh

KEY = dh.KEY


def ed25519_key(seed: int, comment: str) -> str:
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes([seed]) * 32
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


ALICE_KEY = ed25519_key(1, "alice@example")
ROOT_KEY = ed25519_key(2, "ops@example")
HASH = "$y$j9T$F31F/jItUvvjOv6IBFNea/$SFRtZtCIUWcnypijZA5cTGTLcjo306tI.KLnmc0noD1"
ALICE_HASH = "$6$saltsalt$" + "a" * 86

# A CentOS Stream 9 cloud image's files, trimmed: path -> (content, mode, uid, gid).
CENTOS_TREE: dict[str, tuple[str, int, int, int]] = {
    "etc/hostname": ("localhost.localdomain\n", 0o644, 0, 0),
    "etc/fstab": ("UUID=1234 / xfs defaults 0 0\n", 0o644, 0, 0),
    "etc/issue": ("\\S\nKernel \\r on an \\m\n", 0o644, 0, 0),
    "etc/passwd": ("root:x:0:0:root:/root:/bin/bash\n"
                   "bin:x:1:1:bin:/bin:/sbin/nologin\n"
                   "sshd:x:74:74:Privilege-separated SSH:/usr/share/empty.sshd:/sbin/nologin\n"
                   "centos:x:1000:1000:Cloud User:/home/centos:/bin/bash\n", 0o644, 0, 0),
    "etc/group": ("root:x:0:\nbin:x:1:\nwheel:x:10:centos\nsshd:x:74:\nusers:x:100:\ncentos:x:1000:\n",
                  0o644, 0, 0),
    "etc/shadow": ("root:!!:19000:0:99999:7:::\nbin:*:19000:0:99999:7:::\nsshd:!!:19000::::::\n"
                   "centos:!!:19000:0:99999:7:::\n", 0o000, 0, 0),
    "etc/gshadow": ("root:::\nbin:::\nwheel:::centos\nsshd:!::\nusers:::\ncentos:!::\n", 0o000, 0, 0),
    "etc/login.defs": ("MAIL_DIR\t/var/spool/mail\nUMASK\t\t077\nHOME_MODE\t0700\nUID_MIN\t\t\t 1000\n"
                       "UID_MAX\t\t\t60000\nSYS_UID_MIN\t\t  201\nSYS_UID_MAX\t\t  999\nGID_MIN\t\t\t 1000\n"
                       "GID_MAX\t\t\t60000\nSYS_GID_MIN\t\t  201\nSYS_GID_MAX\t\t  999\nCREATE_HOME\tyes\n",
                       0o644, 0, 0),
    "etc/skel/.bashrc": ("# .bashrc\n", 0o644, 0, 0),
    "etc/skel/.bash_profile": ("# .bash_profile\n", 0o644, 0, 0),
    "etc/skel/.config/app.conf": ("x=1\n", 0o600, 0, 0),
    "home/centos/.bashrc": ("# .bashrc\n", 0o644, 1000, 1000),
    "root/.bashrc": ("# root\n", 0o644, 0, 0),
}
CENTOS_DIRS = {"root": 0o550, "home/centos": 0o700, "etc/sudoers.d": 0o750, "etc/skel/.config": 0o700}

USER_DATA = f"""#cloud-config
groups:
  - admins: [centos]
  - cloud-users
users:
  - default
  - name: alice
    gecos: Alice Example
    groups: [wheel, admins]
    sudo: ALL=(ALL) NOPASSWD:ALL
    lock_passwd: false
    hashed_passwd: "{ALICE_HASH}"
    ssh_authorized_keys: ["{ALICE_KEY}"]
  - name: svc
    system: true
    shell: /sbin/nologin
ssh_authorized_keys: ["{ROOT_KEY}"]
write_files:
  - path: /etc/motd.d/welcome
    content: {base64.b64encode(b"hello" + bytes([10])).decode()}
    encoding: b64
    owner: alice:admins
    permissions: '0640'
  - path: /home/alice/notes.txt
    content: {base64.b64encode(gzip.compress(b"notes" + bytes([10]))).decode()}
    encoding: gz+b64
    owner: alice
    permissions: 0600
  - path: /etc/issue
    content: "appended\\n"
    append: true
runcmd:
  - [touch, /var/tmp/ran]
  - echo "second" >> /var/tmp/ran
"""


def build_tree(root: Path) -> Path:
    for rel in CENTOS_DIRS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for rel, (content, mode, uid, gid) in CENTOS_TREE.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        os.chown(p, uid, gid)
        os.chmod(p, mode)
    for rel, mode in CENTOS_DIRS.items():
        os.chmod(root / rel, mode)
    os.chown(root / "home/centos", 1000, 1000)
    return root


def flamingo_variant(tmp_path: Path) -> Variant:
    return dh.make_variant(tmp_path / "etc", agent="flamingo", name="flam")


def inputs(tmp_path: Path, params: dict[str, str]) -> tuple[SeedInput, dict[str, bytes]]:
    (tmp_path / "disk0.img").touch()
    genv = dh.ganeti_env([tmp_path / "disk0.img"], params=params, variant="flam")
    inp = seed_input(genv, flamingo_variant(tmp_path), nonce="t")
    return inp, dict(build_configdrive(inp).files)


def apply(tmp_path: Path, root: Path, **params: str) -> SeedInput:
    inp, drive = inputs(tmp_path, params)
    apply_flamingo_settings(root, drive, inp)
    return inp


def meta(p: Path) -> tuple[int, int, int]:
    st = os.lstat(p)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def expected_guest(instance_id: str) -> dict[str, tuple[str, int, int, int]]:
    """Every file a full user-data changes or makes, whole: path -> (content, mode, uid, gid)."""
    today = int(time.time() // 86400)
    return {
        "etc/hostname": ("vm1.example.org\n", 0o644, 0, 0),
        "etc/passwd": (CENTOS_TREE["etc/passwd"][0]
                       + "alice:x:1001:1003:Alice Example:/home/alice:/bin/bash\n"
                       + "svc:x:999:999::/home/svc:/sbin/nologin\n", 0o644, 0, 0),
        "etc/group": ("root:x:0:\nbin:x:1:\nwheel:x:10:centos,alice\nsshd:x:74:\nusers:x:100:\ncentos:x:1000:\n"
                      "admins:x:1001:alice,centos\ncloud-users:x:1002:\nalice:x:1003:\nsvc:x:999:\n", 0o644, 0, 0),
        "etc/shadow": (f"root:{HASH}:{today}:0:99999:7:::\nbin:*:19000:0:99999:7:::\nsshd:!!:19000::::::\n"
                       f"centos:!!:19000:0:99999:7:::\nalice:{ALICE_HASH}:{today}:0:99999:7:::\n"
                       f"svc:!:{today}:0:99999:7:::\n", 0o000, 0, 0),
        "etc/gshadow": ("root:::\nbin:::\nwheel:::centos,alice\nsshd:!::\nusers:::\ncentos:!::\n"
                        "admins:!::alice,centos\ncloud-users:!::\nalice:!::\nsvc:!::\n", 0o000, 0, 0),
        "etc/issue": (CENTOS_TREE["etc/issue"][0] + "appended\n", 0o644, 0, 0),
        "etc/motd.d/welcome": ("hello\n", 0o640, 1001, 1001),
        "etc/sudoers.d/90-cloud-init-users": ("# Created by instance-cloudimage from the instance's user-data\n\n"
                                              "# User rules for alice\nalice ALL=(ALL) NOPASSWD:ALL\n", 0o440, 0, 0),
        "home/alice/.bashrc": ("# .bashrc\n", 0o644, 1001, 1003),
        "home/alice/.bash_profile": ("# .bash_profile\n", 0o644, 1001, 1003),
        "home/alice/.config/app.conf": ("x=1\n", 0o600, 1001, 1003),
        "home/alice/.ssh/authorized_keys": (ALICE_KEY + "\n", 0o600, 1001, 1003),
        "home/alice/notes.txt": ("notes\n", 0o600, 1001, 1003),
        "root/.ssh/authorized_keys": (f"{KEY}\n{ROOT_KEY}\n", 0o600, 0, 0),
        "var/lib/instance-cloudimage/firstboot/instance-id": (instance_id + "\n", 0o600, 0, 0),
        "var/lib/instance-cloudimage/firstboot/runcmd": ("#!/bin/sh\ntouch /var/tmp/ran\n"
                                                         "echo \"second\" >> /var/tmp/ran\n", 0o700, 0, 0),
        "var/lib/instance-cloudimage/firstboot/run": (RUNNER, 0o700, 0, 0),
    }


def check_guest(root: Path, instance_id: str, hostname: str = "vm1.example.org") -> None:
    """The guest tree after a full flamingo create: changed files whole, every other file untouched."""
    want = expected_guest(instance_id)
    want["etc/hostname"] = (hostname + "\n", 0o644, 0, 0)
    for rel, (content, mode, uid, gid) in want.items():
        p = root / rel
        assert stat.S_ISREG(os.lstat(p).st_mode), rel
        assert (p.read_text(), meta(p)) == (content, (mode, uid, gid)), rel
    for rel, (content, mode, uid, gid) in CENTOS_TREE.items():
        if rel not in want:
            assert ((root / rel).read_text(), meta(root / rel)) == (content, (mode, uid, gid)), rel
    dirs = {"home/alice": (0o700, 1001, 1003), "home/alice/.ssh": (0o700, 1001, 1003),
            "home/alice/.config": (0o700, 1001, 1003), "etc/motd.d": (0o755, 0, 0), "root/.ssh": (0o700, 0, 0),
            "var/lib/instance-cloudimage/firstboot": (0o700, 0, 0), "etc/sudoers.d": (0o750, 0, 0)}
    for rel, m in dirs.items():
        assert meta(root / rel) == m, rel
    assert not (root / "home/svc").exists()  # a system user gets no home, as with useradd -r
    unit = root / "etc/systemd/system/cloudimage-firstboot.service"
    assert "ExecStart=/var/lib/instance-cloudimage/firstboot/run" in unit.read_text()
    assert meta(unit) == (0o644, 0, 0)
    link = root / "etc/systemd/system/multi-user.target.wants/cloudimage-firstboot.service"
    assert os.readlink(link) == "/etc/systemd/system/cloudimage-firstboot.service"
    assert not (root / "mnt/config").exists()
    assert "config-2" not in (root / "etc/fstab").read_text()


def test_a_centos_guest_gets_everything_flamingo_would_apply(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    inp = apply(tmp_path, root, ssh_authorized_keys=KEY, password_hash=HASH, user_data=USER_DATA)
    check_guest(root, inp.instance_id)


def test_applying_twice_changes_nothing_more(tmp_path: Path) -> None:
    """A reinstall writes a fresh image, but applying onto an applied tree must still not duplicate."""
    root = build_tree(tmp_path / "guest")
    inp = apply(tmp_path, root, ssh_authorized_keys=KEY, password_hash=HASH, user_data=USER_DATA)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "issue" not in p.name}
    apply_flamingo_settings(root, dict(build_configdrive(inp).files), inp)
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and "issue" not in p.name}
    assert {p for p in after if before.get(p) != after[p]} <= {root / "etc/sudoers.d/90-cloud-init-users"}


def run_runner(root: Path, state: Path) -> subprocess.CompletedProcess[str]:
    script = RUNNER.replace("/var/lib/instance-cloudimage/firstboot", os.fspath(state))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)


def test_the_first_boot_runner_runs_once_per_instance_id(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    state = root / "var/lib/instance-cloudimage/firstboot"
    out = tmp_path / "ran"
    ud = (f"#cloud-config\nruncmd:\n  - [sh, -c, 'echo run >> {out}']\n  - exit 3\n")
    apply(tmp_path, root, user_data=ud)
    first = run_runner(root, state)
    assert first.returncode == 3 and "runcmd failed with exit code 3" in first.stdout
    assert (state / "done").read_text() == (state / "instance-id").read_text()
    assert meta(state / "done")[0] == 0o600
    assert run_runner(root, state).returncode == 0  # same instance-id: nothing runs
    assert out.read_text() == "run\n"
    (state / "instance-id").write_text("new-instance\n")  # what a reinstall writes
    run_runner(root, state)
    assert out.read_text() == "run\nrun\n"


def test_a_user_script_runs_by_its_own_interpreter(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    out = tmp_path / "py"
    apply(tmp_path, root, user_data=f"#!/usr/bin/python3\nopen({os.fspath(out)!r}, 'w').write('py')\n")
    state = root / "var/lib/instance-cloudimage/firstboot"
    assert meta(state / "user-script") == (0o700, 0, 0) and not (state / "runcmd").exists()
    assert run_runner(root, state).returncode == 0 and out.read_text() == "py"


def test_without_commands_no_unit_is_installed(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    apply(tmp_path, root, user_data="#cloud-config\nusers: [bob]\n")
    assert not (root / "etc/systemd").exists() and not (root / "var/lib/instance-cloudimage").exists()
    assert "bob:x:1001:1001::/home/bob:/bin/bash" in (root / "etc/passwd").read_text()
    assert meta(root / "home/bob") == (0o700, 1001, 1001)  # HOME_MODE of the guest's login.defs


def test_owners_come_from_the_guest_never_the_host(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    # 'sshd' is 74 in the guest; on this host it may be another id or missing.
    ud = "#cloud-config\nwrite_files:\n  - {path: /etc/x, content: x, owner: 'sshd:wheel'}\n"
    apply(tmp_path, root, user_data=ud)
    assert meta(root / "etc/x") == (0o644, 74, 10)
    with pytest.raises(SeedError, match=r"write_files\[0\]\.owner is not a user and group of the image"):
        apply(tmp_path, root, user_data="#cloud-config\nwrite_files:\n  - {path: /etc/y, owner: nobody}\n")


@pytest.mark.parametrize(("link", "message"), [
    # A write_files path is part of the secret user_data: the line names the entry, not the path.
    ("etc/motd.d", r"user_data: write_files\[0\]\.path leads through a symbolic link"),
    ("home", "the image's /home is a symbolic link"),
    ("etc/sudoers.d", "the image's /etc/sudoers.d is a symbolic link"),
])
def test_symlinks_on_the_way_never_reach_the_host(tmp_path: Path, link: str, message: str) -> None:
    root = build_tree(tmp_path / "guest")
    host = tmp_path / "host"
    host.mkdir()
    target = root / link
    if target.is_dir():
        os.rename(target, tmp_path / "moved")
    os.symlink(host, target)
    with pytest.raises(UnsafeImage, match=message) as refused:
        apply(tmp_path, root, user_data=USER_DATA)
    assert "motd" not in str(refused.value)
    assert list(host.iterdir()) == []


def test_without_skel_the_home_is_empty_and_a_linked_skel_is_refused(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    os.rename(root / "etc/skel", tmp_path / "skel")
    apply(tmp_path, root, user_data="#cloud-config\nusers: [bob]\n")
    assert list((root / "home/bob").iterdir()) == [] and meta(root / "home/bob") == (0o700, 1001, 1001)
    root = build_tree(tmp_path / "guest2")
    os.rename(root / "etc/skel", tmp_path / "skel2")
    os.symlink(tmp_path / "skel", root / "etc/skel")
    with pytest.raises(UnsafeImage, match="the image's /etc/skel is a symbolic link"):
        apply(tmp_path, root, user_data="#cloud-config\nusers: [bob]\n")


def test_a_skel_symlink_is_copied_as_a_link_not_followed(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    secret = tmp_path / "host-secret"
    secret.write_text("host\n")
    os.symlink(secret, root / "etc/skel/.profile")
    apply(tmp_path, root, user_data="#cloud-config\nusers: [bob]\n")
    assert os.readlink(root / "home/bob/.profile") == os.fspath(secret)
    assert os.lstat(root / "home/bob/.profile").st_uid == 1001


@pytest.mark.parametrize(("config", "relabel"), [("SELINUX=enforcing\nSELINUXTYPE=targeted\n", True),
                                                ("SELINUX=permissive\n", True), ("SELINUX=disabled\n", False),
                                                (None, False)])
def test_an_selinux_guest_relabels_what_the_host_wrote(tmp_path: Path, config: str | None, relabel: bool) -> None:
    root = build_tree(tmp_path / "guest")
    if config is not None:
        (root / "etc/selinux").mkdir()
        (root / "etc/selinux/config").write_text(config)
    apply(tmp_path, root, ssh_authorized_keys=KEY)
    assert (root / ".autorelabel").exists() == relabel


def test_passwd_entries_that_cannot_be_a_home_are_skipped() -> None:
    text = ("good:x:1000:1000::/home/good:/bin/sh\n"
            "dotdot:x:1001:1001::/home/../../tmp:/bin/sh\n"
            "relative:x:1002:1002::home/rel:/bin/sh\n"
            "hugeuid:x:99999999999999:0::/home/huge:/bin/sh\n"
            "hugegid:x:0:4294967296::/home/huge:/bin/sh\n"
            "superscript:x:\u00b9:0::/home/s:/bin/sh\n")  # isdigit() but not int()
    assert parse_passwd(text) == {"good": (1000, 1000, "/home/good")}


def test_keys_for_a_user_with_a_dotdot_home_are_skipped(tmp_path: Path) -> None:
    root = build_tree(tmp_path / "guest")
    (root / "etc/passwd").write_text("root:x:0:0::/root/../../outside:/bin/sh\n")
    (tmp_path / "outside").mkdir()
    apply(tmp_path, root, ssh_authorized_keys=KEY)
    assert (root / "etc/hostname").read_text() == "vm1.example.org\n"
    assert list((tmp_path / "outside").iterdir()) == []


# --- verify: one line naming what a flamingo variant cannot take ------------------------------------

def verify(tmp_path: Path, user_data: str, variant: str = "flam") -> None:
    flamingo_variant(tmp_path)
    dh.make_variant(tmp_path / "etc", name="ci")
    run_verify(GanetiEnv(20, "cloudimage", variant, 0, {"user_data": user_data}),
               Paths(tmp_path / "etc", tmp_path / "cache"), ["parameters"])


@pytest.mark.parametrize(("user_data", "message"), [
    ("#cloud-config\npackages: [nginx]\n", "user_data: key 'packages' is not supported for flamingo variants"),
    ("#cloud-config\nusers:\n  - {name: a, selinux_user: staff_u}\n",
     r"user_data: users\[0\] has key 'selinux_user', which flamingo variants do not support"),
    ("#cloud-config\nwrite_files:\n  - {path: /x, source: {uri: http://x}}\n",
     r"user_data: write_files\[0\] has key 'source', which flamingo variants do not support"),
    ("#cloud-config\nwrite_files:\n  - {path: /x, encoding: zstd}\n", r"write_files\[0\]\.encoding is not one of"),
    ("#cloud-config\nwrite_files:\n  - {path: /x, content: '!!', encoding: b64}\n",
     r"write_files\[0\]\.content is not valid base64"),
    ("#cloud-config\nwrite_files:\n  - {path: /a/../etc/x}\n", "must be an absolute path without"),
    ("#cloud-config\nwrite_files:\n  - {path: /x, permissions: rw}\n", "must be an octal mode"),
    ("#cloud-config\nusers:\n  - {name: a, homedir: /}\n", r"users\[0\]\.homedir must be an absolute path"),
    ("#cloud-config\nusers:\n  - {name: 'a:b'}\n", r"users\[0\]\.name is not a valid user or group name"),
    ("#cloud-config\nusers:\n  - {name: a, hashed_passwd: hunter2}\n", r"users\[0\]\.hashed_passwd is not a crypt"),
    ("#cloud-config\nssh_authorized_keys: [nonsense]\n",
     "user_data: ssh_authorized_keys entry 1 does not start with a known key type"),
    ("#cloud-config\nruncmd: [{a: b}]\n", r"runcmd\[0\] must be a shell line or a list of arguments"),
    ("#include\nhttps://example.test/x\n", "which flamingo variants do not read"),
])
def test_verify_refuses_what_flamingo_cannot_apply(tmp_path: Path, user_data: str, message: str) -> None:
    with pytest.raises(ParameterError, match=message) as e:
        verify(tmp_path, user_data)
    assert "\n" not in str(e.value) and "nginx" not in str(e.value) and "hunter2" not in str(e.value)


def test_verify_and_create_share_the_check(tmp_path: Path) -> None:
    ud = "#cloud-config\nbootcmd: [x]\n"
    problems = check_variant_parameters({"user_data": ud}, flamingo_variant(tmp_path))
    assert problems == ["user_data: key 'bootcmd' is not supported for flamingo variants "
                        "(flamingo reads only groups, runcmd, ssh_authorized_keys, users, write_files)"]
    with pytest.raises(ParameterError, match="'bootcmd'"):
        inputs(tmp_path, {"user_data": ud})


def test_cloud_init_variants_take_any_key(tmp_path: Path) -> None:
    verify(tmp_path, "#cloud-config\npackages: [nginx]\n", variant="ci")


def test_the_full_user_data_passes_verify(tmp_path: Path) -> None:
    verify(tmp_path, USER_DATA)
    assert json.loads(inputs(tmp_path, {"user_data": USER_DATA})[1]["openstack/latest/meta_data.json"])["hostname"]
