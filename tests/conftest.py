"""Shared fixtures: a site (config + cache + allowed image dir) and real tool checks."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support.httpfixtures import Server, ServerState

REPO = Path(__file__).resolve().parent.parent

# The parser property tests (tests/*/test_*_properties.py): no example database in the work tree,
# and a per-example deadline, so a parser whose time is not linear in its input fails the suite.
# HYPOTHESIS_PROFILE=long runs many more examples locally (fuzz/run.sh is the deeper search).
settings.register_profile("suite", max_examples=300, database=None, deadline=2000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", parent=settings.get_profile("suite"), max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


def need_tools(*tools: str) -> None:
    """Skip locally when a tool is missing; in CI a missing tool is a failure."""
    missing = [t for t in tools if shutil.which(t, path=os.environ.get("PATH", "") + ":/sbin:/usr/sbin") is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI is missing tools: {', '.join(missing)}")
        pytest.skip(f"missing tools: {', '.join(missing)}")


def need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the integration tests as root")
        pytest.skip("needs root")


# Files of the host that no test may change: the suite runs as root, and a disk path that goes
# astray lands on a host file (once, an import blanked /etc/shadow). Checked at the session's end.
HOST_FILES = ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow", "/etc/fstab", "/etc/hostname",
              "/etc/resolv.conf", "/etc/sudoers")


def read_host_files() -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for name in HOST_FILES:
        try:
            found[name] = Path(name).read_bytes()
        except OSError:  # missing, or not readable without root
            found[name] = None
    return found


@pytest.fixture(scope="session", autouse=True)
def _host_files_untouched() -> Iterator[None]:
    before = read_host_files()
    yield
    changed = [name for name, data in read_host_files().items() if data != before[name]]
    if changed:
        pytest.fail(f"the tests changed host files: {', '.join(changed)}", pytrace=False)


@dataclass
class Site:
    root: Path
    config_dir: Path
    cache_dir: Path
    images: Path

    def cli_args(self) -> list[str]:
        return ["--config-dir", str(self.config_dir), "--cache-dir", str(self.cache_dir)]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path, tmp_path / "etc", tmp_path / "cache", tmp_path / "images")
    s.config_dir.mkdir()
    s.images.mkdir()
    (s.config_dir / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {s.images}\n")
    return s


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def cli(*args: str, check: bool = False, stdin: str | None = None,
        as_user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as a user would (``stdin``: its input, else none;
    ``as_user``: as that user, with no supplementary groups, which needs root)."""
    exe = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "instance-cloudimage"
    if not exe.exists():
        exe = Path(shutil.which("instance-cloudimage") or "instance-cloudimage")
    user = []
    if as_user:
        pw = pwd.getpwnam(as_user)
        user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    return subprocess.run([*user, str(exe), *args], capture_output=True, text=True, check=check, input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})


@pytest.fixture
def state() -> Iterator[ServerState]:
    """A real HTTP server on 127.0.0.1 with its request log and fault switches."""
    st = ServerState()
    srv = Server(st)
    yield st
    srv.stop()
