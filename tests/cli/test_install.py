"""install lays out an OS definition Ganeti accepts, whose scripts run in Ganeti's reset env."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from instance_cloudimage.cli import install
from instance_cloudimage.cli.install import install_os
from instance_cloudimage.cli.main import main
from instance_cloudimage.ganeti.simulate import simulated_core_environment
from instance_cloudimage.ganeti.variants import list_variants, read_offered
from instance_cloudimage.params.table import PARAMETERS
from tests.conftest import Site, cli


def test_install_writes_a_valid_os_definition(site: Site, tmp_path: Path) -> None:
    os_dir = tmp_path / "os" / "cloudimage"
    r = cli("install", "--os-dir", str(os_dir), *site.cli_args())
    assert r.returncode == 0, r.stderr
    for verb in ("create", "import", "export", "rename", "verify"):
        mode = (os_dir / verb).stat().st_mode
        assert stat.S_ISREG(mode) and mode & stat.S_IXUSR
        assert (os_dir / verb).read_text().startswith("#!/")
    assert not (os_dir / "create_untrusted").exists()
    assert (os_dir / "ganeti_api_version").read_text() == "20\n"
    # Ganeti reads the list the administrator edits, through a link; the demo is not offered.
    assert (os_dir / "variants.list").readlink() == site.config_dir / "variants.list"
    offered = read_offered(site_paths(site))
    assert offered == [v for v in list_variants(site_paths(site)) if v != "demo"] and "debian-12" in offered
    names = [line.split(" ", 1)[0] for line in (os_dir / "parameters.list").read_text().splitlines()]
    assert names == [p.name for p in PARAMETERS]
    info = json.loads((os_dir / "instance-cloudimage.json").read_text())
    assert info == {"config_dir": str(site.config_dir), "cache_dir": str(site.cache_dir)}


def site_paths(site: Site):  # type: ignore[no-untyped-def]
    from instance_cloudimage.runtime.siteconfig import Paths

    return Paths(site.config_dir, site.cache_dir)


def run_verify(env: dict[str, str], os_dir: Path) -> subprocess.CompletedProcess[str]:
    """The installed verify script, run as Ganeti runs it: exactly ``env``, cwd = the OS dir."""
    return subprocess.run([str(os_dir / "verify"), "parameters"], env=env, cwd=os_dir,
                          capture_output=True, text=True, check=False)


def test_installed_verify_runs_with_ganetis_reset_environment(site: Site, tmp_path: Path) -> None:
    os_dir = tmp_path / "os" / "cloudimage"
    install_os(os_dir, site_paths(site))
    # Exactly what Ganeti passes verify: no HOME, no LANG, cwd = the OS dir.
    env = simulated_core_environment("debian-12", params={"arch": "x86_64"})
    r = run_verify(env, os_dir)
    assert r.returncode == 0, r.stderr
    r = run_verify({**env, "OSP_NOPE": "1"}, os_dir)
    assert r.returncode == 1 and "unknown OS parameter 'nope'" in r.stderr


def test_installed_verify_refuses_a_variant_the_node_does_not_offer(site: Site, tmp_path: Path) -> None:
    os_dir = tmp_path / "os" / "cloudimage"
    install_os(os_dir, site_paths(site))
    env = simulated_core_environment("demo", params={"arch": "x86_64"})
    r = run_verify(env, os_dir)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"cloudimage verify: error: variant 'demo' is not offered on this node (an administrator adds it to "
        f"{site.config_dir / 'variants.list'} on every node)"]
    # Listed, it is offered: the list is what the administrator edits.
    with open(site.config_dir / "variants.list", "a") as f:
        f.write("demo\n")
    r = run_verify(env, os_dir)
    assert r.returncode == 0, r.stderr


def test_install_keeps_the_administrators_variants_list(site: Site, tmp_path: Path) -> None:
    os_dir = tmp_path / "os" / "cloudimage"
    listed = "# only these\n\ndebian-12\n  demo  \n"
    (site.config_dir / "variants.list").write_text(listed)
    assert install_os(os_dir, site_paths(site)) == ["debian-12", "demo"]
    assert (site.config_dir / "variants.list").read_text() == listed
    (site.config_dir / "variants.list").write_text("debian-12\nnope-1\n")
    r = cli("install", "--os-dir", str(os_dir), *site.cli_args())
    assert r.returncode == 2
    assert "variants.list lists unknown variants: nope-1" in r.stderr


def test_a_new_variants_list_offers_the_sites_variants_too(site: Site, tmp_path: Path) -> None:
    (site.config_dir / "variants").mkdir()
    (site.config_dir / "variants" / "mysite.conf").write_text("[Image]\nURL = https://example.org/i.qcow2\n")
    install_os(tmp_path / "os" / "cloudimage", site_paths(site))
    offered = read_offered(site_paths(site))
    assert offered is not None and "mysite" in offered and "demo" not in offered


def test_install_warns_when_it_shadows_the_package(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    package_os = tmp_path / "usr-share" / "cloudimage"
    package_os.mkdir(parents=True)
    (package_os / "create").write_text("")
    monkeypatch.setattr(install, "PACKAGE_OS_DIR", package_os)
    monkeypatch.setattr(install, "OS_SEARCH_PATH", (tmp_path / "srv", package_os.parent))
    with caplog.at_level(logging.WARNING):
        install.warn_if_shadowing(tmp_path / "elsewhere" / "cloudimage")
        assert not caplog.records
        install.warn_if_shadowing(tmp_path / "srv" / "cloudimage")
    assert [r.getMessage() for r in caplog.records] == [
        f"warning: the package ganeti-instance-cloudimage has this OS in {package_os} too; Ganeti uses the first "
        "in its search path, and Ganeti 3.0's gnt-os diagnose fails on a shadowed OS (remove "
        f"{tmp_path / 'srv' / 'cloudimage'}, or the package)"]


def test_the_package_build_installs_into_package_os_dir() -> None:
    rules = (Path(__file__).resolve().parents[2] / "debian" / "rules").read_text()
    assert f"\nOS_DIR := {install.PACKAGE_OS_DIR}\n" in rules


def test_install_into_a_package_build_tree(site: Site, tmp_path: Path) -> None:
    """--destdir: files under the staging tree, the installed paths baked in, and the build
    machine's own site variants left out."""
    (site.config_dir / "variants").mkdir()
    (site.config_dir / "variants" / "buildhost.conf").write_text("[Image]\nURL = https://example.org/i.qcow2\n")
    stage = tmp_path / "stage"
    os_dir = tmp_path / "usr" / "share" / "ganeti" / "os" / "cloudimage"
    r = cli("install", "--os-dir", str(os_dir), "--destdir", str(stage), *site.cli_args())
    assert r.returncode == 0, r.stderr
    staged_os = stage / os_dir.relative_to("/")
    assert not os_dir.exists() and not (site.config_dir / "variants.list").exists()
    assert (staged_os / "variants.list").readlink() == site.config_dir / "variants.list"
    staged_list = stage / site.config_dir.relative_to("/") / "variants.list"
    names = [n for n in staged_list.read_text().splitlines() if not n.startswith("#")]
    assert "debian-12" in names and "buildhost" not in names and "demo" not in names
    info = json.loads((staged_os / "instance-cloudimage.json").read_text())
    assert info == {"config_dir": str(site.config_dir), "cache_dir": str(site.cache_dir)}


def test_install_refuses_a_broken_site_variant(site: Site, tmp_path: Path) -> None:
    (site.config_dir / "variants").mkdir()
    (site.config_dir / "variants" / "broken.conf").write_text("[Image]\nNope = 1\n")
    r = cli("install", "--os-dir", str(tmp_path / "os" / "cloudimage"), *site.cli_args())
    assert r.returncode == 2
    assert "unknown setting [Image] Nope" in r.stderr
    assert not os.path.exists(tmp_path / "os" / "cloudimage" / "create")


def test_install_into_an_unusable_directory_is_one_line(site: Site, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = cli("install", "--os-dir", str(tmp_path / "file" / "cloudimage"), *site.cli_args())
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"instance-cloudimage: error: cannot install the OS definition into {tmp_path / 'file' / 'cloudimage'}: "
        "Not a directory"]


# --- the warm worker of earlier versions -----------------------------------------------------

# The units 'install --systemd-dir' wrote, as the last version with the worker rendered them.
OLD_SOCKET_UNIT = """[Unit]
Description=instance-cloudimage warm worker socket (Ganeti OS scripts start without their imports)

[Socket]
ListenStream={socket}
SocketMode=0600
DirectoryMode=0700

[Install]
WantedBy=sockets.target
"""
OLD_SERVICE_UNIT = """[Unit]
Description=instance-cloudimage warm worker (forks a child per Ganeti OS script run)
Requires=instance-cloudimage-worker.socket
After=instance-cloudimage-worker.socket

[Service]
ExecStart=/opt/instance-cloudimage/bin/python3 -P -m instance_cloudimage worker
KillMode=process
Restart=on-failure
"""


@dataclass
class OldWorker:
    unit_dir: Path
    units: list[Path]
    link: Path
    socket: Path  # where the scripts looked by default
    chosen: Path  # where 'install --worker-socket' put the units' socket
    calls: list[list[str]]


def listening(path: Path) -> None:
    """A real unix socket at ``path``, as systemd leaves it after the worker stops."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(path))


@pytest.fixture
def old_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OldWorker:
    unit_dir = tmp_path / "system"
    (unit_dir / "sockets.target.wants").mkdir(parents=True)
    chosen = tmp_path / "srv" / "w.sock"
    units = [unit_dir / "instance-cloudimage-worker.socket", unit_dir / "instance-cloudimage-worker.service"]
    units[0].write_text(OLD_SOCKET_UNIT.format(socket=chosen))
    units[1].write_text(OLD_SERVICE_UNIT)
    link = unit_dir / "sockets.target.wants" / "instance-cloudimage-worker.socket"
    link.symlink_to(units[0])
    default = tmp_path / "run" / "instance-cloudimage" / "worker.sock"
    listening(default)
    listening(chosen)
    calls: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr(install, "run", fake_run)  # the process.run seam: no real systemctl
    monkeypatch.setattr(install, "SYSTEMD_BOOTED", tmp_path / "no-systemd")
    return OldWorker(unit_dir, units, link, default, chosen, calls)


def test_the_old_worker_is_stopped_disabled_and_removed(old_worker: OldWorker, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "booted").mkdir()
    monkeypatch.setattr(install, "SYSTEMD_BOOTED", tmp_path / "booted")
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        removed = install.remove_old_worker([old_worker.unit_dir], old_worker.socket)
    names = ["instance-cloudimage-worker.socket", "instance-cloudimage-worker.service"]
    assert old_worker.calls == [["systemctl", "disable", "--now", *names], ["systemctl", "daemon-reload"]]
    assert removed == [old_worker.link, *old_worker.units, old_worker.socket, old_worker.chosen]
    assert not any(os.path.lexists(p) for p in removed)
    assert [r.getMessage() for r in caplog.records] == [
        f"stopped, disabled and removed {old_worker.units[0]}: this version has no warm worker",
        f"stopped, disabled and removed {old_worker.units[1]}: this version has no warm worker",
        f"removed {old_worker.socket}, the warm worker's socket",
        f"removed {old_worker.chosen}, the warm worker's socket"]
    old_worker.calls.clear()
    assert install.remove_old_worker([old_worker.unit_dir], old_worker.socket) == []  # once is enough
    assert old_worker.calls == []


def test_without_systemd_the_files_go_and_only_sockets_are_unlinked(old_worker: OldWorker) -> None:
    old_worker.chosen.unlink()
    old_worker.chosen.write_text("not a socket\n")  # whatever the unit named, only a socket is removed
    removed = install.remove_old_worker([old_worker.unit_dir], old_worker.socket)
    assert old_worker.calls == []  # no systemd to ask
    assert removed == [old_worker.link, *old_worker.units, old_worker.socket]
    assert old_worker.chosen.read_text() == "not a socket\n"


def test_install_removes_the_old_worker(old_worker: OldWorker, site: Site, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "OLD_UNIT_DIRS", (tmp_path / "elsewhere", old_worker.unit_dir))
    monkeypatch.setattr(install, "OLD_WORKER_SOCKET", old_worker.socket)
    logger = logging.getLogger("instance_cloudimage")  # main() sets it up; later tests get it back as it was
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, attr, getattr(logger, attr))
    monkeypatch.setattr(logger, "handlers", [])
    assert main(["install", "--os-dir", str(tmp_path / "os" / "cloudimage"), *site.cli_args()]) == 0
    assert not any(os.path.lexists(p) for p in [old_worker.link, *old_worker.units, old_worker.chosen])
    assert not old_worker.socket.parent.exists()  # the directory systemd made for it
    assert (tmp_path / "os" / "cloudimage" / "create").exists()


def test_a_failed_systemctl_is_one_warning_and_the_files_still_go(old_worker: OldWorker, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "booted").mkdir()
    monkeypatch.setattr(install, "SYSTEMD_BOOTED", tmp_path / "booted")
    denied = subprocess.CompletedProcess([], 1, b"", b"Access denied\n")
    monkeypatch.setattr(install, "run", lambda argv, **kw: denied)
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        install.remove_old_worker([old_worker.unit_dir], old_worker.socket)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == ("systemctl disable --now instance-cloudimage-worker.socket "
                           "instance-cloudimage-worker.service failed: Access denied")
    assert messages[1] == f"removed {old_worker.units[0]}: this version has no warm worker"
    assert not any(os.path.lexists(p) for p in old_worker.units)
