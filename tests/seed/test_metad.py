"""metad refresh: the unit the seed installs, read back by Debian's cloud-init, and its guest script
run (under the system's python3, as in a guest) against a real HTTP server standing in for metad.
The real metad on the real cluster: tests/ganeti/cluster/test_metad.py."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.ganeti.env import GanetiEnv, Instance, Nic
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.params.table import validate_parameters
from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.runtime.siteconfig import SITE_SETTINGS, SiteConfig
from instance_cloudimage.seed.content import build_nocloud, seed_input
from instance_cloudimage.seed.metad import CONFIG_PATH, SCRIPT_PATH, UNIT_NAME
from tests.support import delivery_helpers as dh
from tests.support.httpfixtures import ServerState

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM2ziK4RM0utYUnNU57yaVLln5aVvIYlUM/oaMR+Tcc1 alice@example"
ED2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXg0BvBqVzZSmaYdnQd4dOYZDsaSX0WrFsMiDI8/NMg bob@example"
ED3 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ2KTnNxkVQYDzwH2pGMjhzvFAzO0ZbbM4iEZ1Db/Hay carol@example"
NIC = Nic(0, "aa:00:00:00:00:01")
NIC_COMM = Nic(1, "52:54:00:12:34:56", name="ganeti:communication:inst1.example.test")
PATH = "/ganeti/latest/os/parameters.json"
GUEST_PYTHON = "/usr/bin/python3"  # the system's, as a guest's would be: not the project's venv


@pytest.fixture
def variants(tmp_path: Path) -> Any:
    return dh.variant_loader(tmp_path, old_ci_user="debian")


def site(**values: object) -> SiteConfig:
    return SiteConfig(values={**{s.dest: s.default for s in SITE_SETTINGS}, **values})


def seed(variant: Variant, params: Mapping[str, str] | None = None, nics: tuple[Nic, ...] = (NIC, NIC_COMM),
         site_config: SiteConfig | None = None) -> dict[str, bytes]:
    inst = Instance(name="inst1.example.test", uuid="68c41cfd-8b97-4cda-8ba0-674afdb4b6bd", os="cloudimage",
                    hypervisor="kvm", primary_node=None, secondary_nodes=(), disks=(), nics=nics)
    genv = GanetiEnv(20, "cloudimage", variant.name, 0, dict(params or {}), instance=inst)
    return dict(build_nocloud(seed_input(genv, variant, site=site_config)).files)


def cloud_init_reads(files: Mapping[str, bytes]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return dh.run_reader("nocloud", Path(tmp))


def unit_files(merged: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in merged.get("write_files", [])}


def test_cloud_init_gets_the_unit_with_a_communication_nic(variants: Any) -> None:
    out = cloud_init_reads(seed(variants("debian-12"), {"ssh_authorized_keys": ED}))
    files = unit_files(out["merged"])
    assert sorted(files) == sorted([SCRIPT_PATH, f"/etc/systemd/system/{UNIT_NAME}", CONFIG_PATH])
    assert files[SCRIPT_PATH]["permissions"] == "0755"
    assert "ExecStart=/usr/bin/python3 /usr/local/lib/instance-cloudimage/metad-refresh" in \
        files[f"/etc/systemd/system/{UNIT_NAME}"]["content"]
    assert json.loads(files[CONFIG_PATH]["content"]) == {"user": "debian", "hostname": "inst1.example.test",
                                                         "ssh_authorized_keys": [ED]}
    assert out["merged"]["runcmd"] == [["systemctl", "enable", UNIT_NAME]]


def test_the_users_runcmd_and_write_files_are_kept(variants: Any) -> None:
    ud = "#cloud-config\nruncmd: [[touch, /x]]\nwrite_files: [{path: /etc/y, content: y}]\n"
    merged = cloud_init_reads(seed(variants("debian-12"), {"user_data": ud}))["merged"]
    assert merged["runcmd"] == [["systemctl", "enable", UNIT_NAME], ["touch", "/x"]]
    assert "/etc/y" in unit_files(merged) and SCRIPT_PATH in unit_files(merged)
    mime = cloud_init_reads(seed(variants("debian-12"), {"user_data": "#!/bin/sh\necho hi\n"}))
    assert SCRIPT_PATH in unit_files(mime["merged"])  # our part of a multipart


@pytest.mark.parametrize("case", ["no communication NIC", "parameter off", "site off", "flamingo"])
def test_no_unit_when_metad_is_out_of_reach_or_turned_off(variants: Any, case: str) -> None:
    variant = variants("flamingo-test" if case == "flamingo" else "debian-12")
    params = {"metad_refresh": "no"} if case == "parameter off" else {}
    nics = (NIC,) if case == "no communication NIC" else (NIC, NIC_COMM)
    site_config = site(metad_refresh=False) if case == "site off" else None
    user_data = seed(variant, params, nics, site_config)["user-data"]
    assert b"metad" not in user_data and b"runcmd" not in user_data


def test_the_parameter_beats_the_site(variants: Any) -> None:
    files = seed(variants("debian-12"), {"metad_refresh": "yes"}, site_config=site(metad_refresh=False))
    assert SCRIPT_PATH.encode() in files["user-data"]


def test_metad_refresh_must_be_yes_or_no(variants: Any) -> None:
    assert validate_parameters({"metad_refresh": "sometimes"}, site()) == ["metad_refresh must be yes or no"]
    with pytest.raises(ParameterError, match="metad_refresh must be yes or no"):
        seed(variants("debian-12"), {"metad_refresh": "sometimes"})


def test_generated_cloud_config_passes_cloud_init_schema(variants: Any, tmp_path: Path) -> None:
    path = tmp_path / "user-data"
    path.write_bytes(seed(variants("debian-12"), {"ssh_authorized_keys": ED})["user-data"])
    r = subprocess.run(["/usr/bin/cloud-init", "schema", "-c", os.fspath(path)], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and "Valid cloud-config" in r.stdout, r.stdout + r.stderr


# --- the guest script against an HTTP server ------------------------------------------------------

def install_guest(root: Path, variant: Variant, params: Mapping[str, str]) -> Path:
    """A scratch guest with what cloud-init's first boot leaves: the seed's write_files, the default
    user with the seed's keys, /etc/hostname and /etc/hosts.  Returns the script."""
    merged = cloud_init_reads(seed(variant, params))["merged"]
    for f in merged["write_files"]:
        p = root / f["path"].lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f["content"])
        p.chmod(int(f["permissions"], 8))
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\ndebian:x:1000:1000::/home/debian:/bin/bash\n")
    ssh = root / "home/debian/.ssh"
    ssh.mkdir(parents=True)
    (ssh / "authorized_keys").write_text("# added by hand\nssh-ed25519 AAAAmine me@laptop\n" + ED + "\n")
    (root / "etc/hostname").write_text("inst1\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 inst1.example.test inst1\n")
    return root / SCRIPT_PATH.lstrip("/")


def run_guest(script: Path, root: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([GUEST_PYTHON, os.fspath(script), "--root", os.fspath(root), "--url", url, *extra],
                       capture_output=True, text=True, check=False, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r


def serve(state: ServerState, **params: str) -> None:
    state.files[PATH] = json.dumps({k: [v, "public"] for k, v in params.items()} |
                                   {"password_hash": ["$y$secret", "secret"]}).encode()


def test_the_guest_applies_new_keys_and_hostname_once(variants: Any, tmp_path: Path, state: ServerState) -> None:
    root = tmp_path / "guest"
    script = install_guest(root, variants("debian-12"), {"ssh_authorized_keys": ED})
    keys = root / "home/debian/.ssh/authorized_keys"
    serve(state, ssh_authorized_keys=ED)  # what the seed set: nothing to do
    before = keys.read_bytes()
    assert run_guest(script, root, state.url(PATH)).stderr == ""
    assert keys.read_bytes() == before and not (root / "var/lib/instance-cloudimage/metad-keys").exists()

    serve(state, ssh_authorized_keys=f"{ED2};{ED3}", hostname="web.example.org")
    out = run_guest(script, root, state.url(PATH))
    assert "applied 2 SSH key(s) from metad for debian" in out.stderr and "secret" not in out.stderr
    assert keys.read_text() == f"# added by hand\nssh-ed25519 AAAAmine me@laptop\n{ED2}\n{ED3}\n"
    assert (keys.stat().st_mode & 0o777, keys.stat().st_uid) == (0o600, 1000)
    assert (root / "etc/hostname").read_text() == "web\n"
    assert (root / "etc/hosts").read_text() == "127.0.0.1 localhost\n127.0.1.1 web.example.org web\n"

    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert run_guest(script, root, state.url(PATH)).stderr == ""  # the next boot: already applied
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == after

    serve(state, ssh_authorized_keys=ED3)  # a second rotation drops what the first one added
    run_guest(script, root, state.url(PATH))
    assert keys.read_text() == f"# added by hand\nssh-ed25519 AAAAmine me@laptop\n{ED3}\n"


def test_the_default_user_is_found_by_the_seeds_keys_without_default_user(variants: Any, tmp_path: Path,
                                                                         state: ServerState) -> None:
    root = tmp_path / "guest"
    script = install_guest(root, variants("almalinux-9"), {"ssh_authorized_keys": ED})
    assert json.loads((root / CONFIG_PATH.lstrip("/")).read_text())["user"] is None
    serve(state, ssh_authorized_keys=ED2)
    assert "for debian" in run_guest(script, root, state.url(PATH)).stderr
    assert (root / "home/debian/.ssh/authorized_keys").read_text().endswith(f"\n{ED2}\n")


@pytest.mark.parametrize(("fault", "logged"), [
    ("404", "metad does not know this instance (404"),
    ("500", "giving up; the guest is left as it is"),
    ("not json", "metad's reply is not JSON"),
    ("timeout", "metad cannot be reached (timed out"),
    ("no nic", "metad cannot be reached ("),
])
def test_faults_are_logged_and_change_nothing(variants: Any, tmp_path: Path, state: ServerState, fault: str,
                                              logged: str) -> None:
    root = tmp_path / "guest"
    script = install_guest(root, variants("debian-12"), {"ssh_authorized_keys": ED})
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    url = state.url(PATH)
    serve(state, ssh_authorized_keys=ED2)
    if fault in ("404", "500"):
        state.status[PATH] = int(fault)
    elif fault == "not json":
        state.files[PATH] = b"<html>"
    elif fault == "timeout":
        state.stall[PATH] = 3
    else:
        url = "http://127.0.0.1:9/ganeti/latest/os/parameters.json"  # nothing listens: no route to metad
    out = run_guest(script, root, url, "--attempts", "2", "--timeout", "0.5")
    assert logged in out.stderr
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_the_guest_script_is_python_3_7_and_standard_library_only() -> None:
    """EL9 guests have Python 3.9, older guests 3.7: the grammar must not be newer, and nothing
    but the standard library may be imported (the guest has nothing else for certain)."""
    import ast
    import sys

    from instance_cloudimage.seed.metad import guest_script

    tree = ast.parse(guest_script(), feature_version=(3, 7))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= sys.stdlib_module_names | {"__future__"}, imported
