"""Helpers for the tests that drive a real two-node Ganeti cluster (see conftest.py, twonode.sh).

Every Ganeti command runs inside a node through ``twonode.sh exec``, with Ganeti's clean
environment; the nodes' private directories are read and written from the host through
``host_path``, which maps a path as a node sees it to where it lives on the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.support.ganeti_host import GntError, GntResult, run_logged

HERE = Path(__file__).resolve().parent
TWONODE_SH = HERE / "twonode.sh"
TN_BASE = Path("/tmp/twonode")  # fixed, so that a killed session's remnants are found and removed
DOMAIN = "example.test"
NODES = ("node1", "node2")
NODE_IP = {"node1": "203.0.113.1", "node2": "203.0.113.2"}
HOST_BRIDGE = "gnttn0"
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "TN_BASE": os.fspath(TN_BASE)}
OS_NAME = "cloudimage"
OS_DIR = "/srv/ganeti/os/cloudimage"
CONFIG_DIR = "/etc/ganeti/instance-cloudimage"
# The nodes' Python environment (docs/install.md, "A cluster on the venv route"): one path, the
# same on every node; here under the shared /tmp, so both nodes' pip installs write one venv.
VENV = TN_BASE / "venv"
COMMAND = os.fspath(VENV / "bin" / "instance-cloudimage")
TIMEOUT = 600.0
# What each node keeps privately, as the node sees it -> the host directory behind it.
_PRIVATE = {
    "/srv/ganeti": "srv-ganeti",
    "/etc/ganeti": "etc-ganeti",
    "/var/lib/ganeti": "var-lib-ganeti",
    "/var/log/ganeti": "var-log-ganeti",
    "/var/cache": "var-cache",
    "/root": "root",
}


@dataclass(frozen=True)
class Installed:
    """``gnt-cluster verify`` after each step of the install, and ``gnt-os diagnose`` at the end."""

    on_master_only: GntResult
    without_config: GntResult
    everywhere: GntResult
    diagnose: GntResult


def fqdn(short: str) -> str:
    return short if "." in short else f"{short}.{DOMAIN}"


def twonode_sh(*args: str, timeout: float = TIMEOUT) -> GntResult:
    return run_logged(["bash", os.fspath(TWONODE_SH), *args], env=CLEAN_ENV, timeout=timeout, cwd="/")


@dataclass
class TwoNodes:
    """The running two-node cluster; node1 is the master."""

    work_dir: Path

    def on(self, node: str, *argv: str, check: bool = True, timeout: float = TIMEOUT) -> GntResult:
        """``argv`` run inside ``node`` (as root, Ganeti's clean environment)."""
        result = twonode_sh("exec", node, *argv, timeout=timeout)
        if check and result.returncode != 0:
            raise GntError(result)
        return result

    def gnt(self, *argv: str, check: bool = True, timeout: float = TIMEOUT) -> GntResult:
        """A command on the master, where an administrator runs Ganeti's tools."""
        return self.on("node1", *argv, check=check, timeout=timeout)

    @staticmethod
    def host_path(node: str, path: str) -> Path:
        """Where ``path`` of ``node``'s private directories is on the host."""
        for inside, name in _PRIVATE.items():
            if path == inside or path.startswith(inside + "/"):
                return TN_BASE / "nodes" / node / name / path[len(inside):].lstrip("/")
        raise AssertionError(f"{path} is not private to a node: both nodes see the host's")

    def distribute_site_config(self) -> None:
        """docs/install.md, "Site configuration on every node": every file of the master's config
        directory (its directories first: copyfile needs them on the other nodes)."""
        top = self.host_path("node1", CONFIG_DIR)
        below = sorted(top.rglob("*"))
        directories = [CONFIG_DIR, *(f"{CONFIG_DIR}/{d.relative_to(top)}" for d in below if d.is_dir())]
        self.gnt("gnt-cluster", "command", " ".join(["mkdir", "-p", *directories]))
        for f in (p for p in below if p.is_file()):
            self.gnt("gnt-cluster", "copyfile", f"{CONFIG_DIR}/{f.relative_to(top)}")

    def node_pid(self, node: str) -> int:
        """The host PID of ``node``'s PID 1 (its namespaces are that process's)."""
        return int((TN_BASE / "state" / f"{node}.pid").read_text())

    def verify(self) -> GntResult:
        """``gnt-cluster verify``; -I ENODESETUP only for this kernel's missing /proc/sysrq-trigger."""
        return self.gnt("gnt-cluster", "verify", "-I", "ENODESETUP", check=False)

    def instances(self) -> list[str]:
        return self.gnt("gnt-instance", "list", "--no-headers", "-o", "name").stdout.split()

    def exports(self) -> set[str]:
        out = self.gnt("gnt-backup", "list", "--no-headers", "-o", "export").stdout
        return set(out.split()) - {"?"}

    def field_of(self, name: str, field: str) -> str:
        return self.gnt("gnt-instance", "list", "--no-headers", "--separator=|", "-o", field,
                        fqdn(name)).stdout.strip()

    def add_instance(self, name: str, node: str, variant: str, extra: Iterable[str] = ()) -> GntResult:
        """``gnt-instance add -o cloudimage+VARIANT -n NODE``: a file disk, one NIC, not started."""
        return self.gnt("gnt-instance", "add", "-o", f"{OS_NAME}+{variant}", "-t", "file",
                        "--disk", "0:size=128M", "-B", "memory=128M", "--no-start", "--no-name-check",
                        "--no-ip-check", "-n", fqdn(node), *extra, fqdn(name))

    def remove_instance(self, name: str, check: bool = True) -> GntResult:
        return self.gnt("gnt-instance", "remove", "-f", "--ignore-failures", fqdn(name), check=check)

    def remove_export(self, name: str, check: bool = True) -> GntResult:
        return self.gnt("gnt-backup", "remove", fqdn(name), check=check)

    def export(self, name: str, to: str, extra: Iterable[str] = ()) -> Path:
        """``gnt-backup export -n TO``; the host path of the disk's dump in TO's export directory."""
        self.gnt("gnt-backup", "export", "-n", fqdn(to), *extra, fqdn(name))
        export_dir = self.host_path(to, f"/var/lib/ganeti/export/{fqdn(name)}")
        (dump,) = (p for p in export_dir.iterdir() if p.name != "config.ini")
        return dump

    def import_(self, name: str, node: str, exported_on: str) -> GntResult:
        """``gnt-backup import`` of ``name``'s export on ``exported_on`` onto ``node``, with a new MAC."""
        return self.gnt("gnt-backup", "import", "-t", "file", "--disk", "0:size=128M", "--net", "0:mac=generate",
                        "-n", fqdn(node), "--src-node", fqdn(exported_on),
                        "--src-dir", f"/var/lib/ganeti/export/{fqdn(name)}", "--no-name-check", "--no-ip-check",
                        fqdn(name))

    def disk_of(self, name: str, node: str) -> Path:
        """The host path of the file disk 0 of ``name`` on ``node`` (file template)."""
        found = sorted(self.host_path(node, f"/srv/ganeti/file-storage/{fqdn(name)}").glob("*.disk0"))
        assert len(found) == 1, f"disk 0 of {name} on {node}: {found}"
        return found[0]

    def os_log(self, node: str, kind: str, name: str) -> str:
        """The newest log of ``kind`` (add, import, export, rename) of ``name``'s OS scripts on ``node``."""
        logs = sorted(self.host_path(node, "/var/log/ganeti/os").glob(f"{kind}-{OS_NAME}+*-{fqdn(name)}-*.log"),
                      key=lambda p: p.stat().st_mtime_ns)
        assert logs, f"no {kind} log of {name} on {node}"
        return logs[-1].read_text(errors="replace")
