"""A real two-node Ganeti cluster for the tests in this directory.

The session-scoped ``two_nodes`` fixture builds the cluster with twonode.sh (each node a set of
Linux namespaces on this host), and tears it down at the end, also when tests fail, then checks
that nothing is left: no node process or Ganeti daemon, no bridge or veth, no loop device, no
mount, no work directory.  It cannot run beside the single-node cluster (tests/ganeti/cluster):
``occupy`` stops that one first.

``installed`` then puts the OS definition on the cluster exactly as docs/install.md ("A cluster
on the venv route") tells an administrator, recording ``gnt-cluster verify`` after each step for
test_across_nodes.py.  The nodes share the host's /usr, so the Debian package could not show a
distribution at all: whatever INSTANCE_CLOUDIMAGE_CLUSTER_INSTALL says, this suite runs the venv
route into each node's own /srv/ganeti/os, with an installed package's OS definition set aside
meanwhile (Ganeti 3.0's gnt-os diagnose fails on a shadowed OS).  The nodes' venv is built with
Debian's /usr/bin/python3: the test session's interpreter may live under /root, which is private
to each node.

Every test here is marked ``ganeti``; without root or Ganeti they are skipped with the reason,
under CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from twonode_cluster import (
    COMMAND,
    CONFIG_DIR,
    HOST_BRIDGE,
    NODES,
    OS_DIR,
    TN_BASE,
    VENV,
    Installed,
    TwoNodes,
    twonode_sh,
)

from instance_cloudimage.cli.install import PACKAGE_OS_DIR
from tests.support.ganeti_host import (
    GntResult,
    loop_devices_of,
    mark_ganeti,
    put_back,
    remove_what_the_test_added,
    require_owner,
    run_on_the_machine,
    set_aside,
    skip_or_fail,
    why_no_cluster,
)

OWNER = "two-node"
REPO = Path(__file__).resolve().parents[3]
GANETI_DAEMONS = ("ganeti-noded", "ganeti-confd", "ganeti-wconfd", "ganeti-luxid", "ganeti-rapi",
                  "ganeti-mond", "ganeti-metad", "ganeti-kvmd", "sshd")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_ganeti(items, Path(__file__).parent)


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    reason = why_no_cluster() or (None if os.path.exists("/usr/sbin/sshd") else
                                  "the two-node cluster needs openssh-server (run: sudo .ci/setup)")
    if reason:
        skip_or_fail(reason)
    # The single-node suite's cluster stops first.
    yield from run_on_the_machine(OWNER, _session(tmp_path_factory.mktemp("twonode")))


def _session(work: Path) -> Generator[TwoNodes, None, None]:
    """The cluster's whole life as a generator: its ``close()`` tears it down."""
    log = work / "twonode.log"
    set_aside(PACKAGE_OS_DIR)
    try:
        result = logged(log, twonode_sh("setup"))  # tears a killed session's remnants down first
        if result.returncode != 0:
            pytest.fail(f"two-node cluster setup failed:\n{result.describe()}", pytrace=False)
        yield TwoNodes(work)
    finally:
        result = logged(log, twonode_sh("teardown"))
        if (TN_BASE / "logs").is_dir():
            shutil.copytree(TN_BASE / "logs", work / "logs", dirs_exist_ok=True)
        shutil.rmtree(TN_BASE, ignore_errors=True)
        put_back(PACKAGE_OS_DIR)
        if result.returncode != 0:
            pytest.fail(f"two-node cluster teardown failed (see {log}):\n{result.describe()}", pytrace=False)
        left = leftovers()
        if left:
            pytest.fail(f"two-node cluster teardown left state behind: {'; '.join(left)} (see {log})",
                        pytrace=False)


def logged(log: Path, result: GntResult) -> GntResult:
    with open(log, "a") as f:
        f.write(result.describe() + "\n")
    return result


def leftovers() -> list[str]:
    """What of the cluster is still on the host after teardown."""
    found = []
    own_pid_ns = os.readlink("/proc/self/ns/pid")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            pid_ns = os.readlink(proc / "ns" / "pid")
        except OSError:
            continue  # gone meanwhile
        if os.fspath(TN_BASE) in argv or (pid_ns != own_pid_ns and any(d in argv for d in GANETI_DAEMONS)):
            found.append(f"process {proc.name} ({argv.strip()[:80]})")
    links = [n for n in (HOST_BRIDGE, *(f"tnv-{node}" for node in NODES)) if Path("/sys/class/net", n).exists()]
    found += [f"network link {n}" for n in links]
    found += [f"loop device {d}" for d in loop_devices_of(TN_BASE)]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if os.fspath(TN_BASE) in line]
    found += [f"mount {m}" for m in mounts]
    if TN_BASE.exists():
        found.append(f"{TN_BASE}")
    return found


@pytest.fixture(scope="session")
def installed(two_nodes: TwoNodes) -> Installed:
    """The OS definition on both nodes, by docs/install.md's recipe "A cluster on the venv route"."""
    nodes = two_nodes
    wheel_dir, source = nodes.work_dir / "wheel", nodes.work_dir / "source"
    # The docs' wheel: python3 -m pip wheel --no-deps -w dist . (here by the session's pip), from
    # a copy: setuptools builds in the tree, and a build/ left from earlier may hold stale modules.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", os.fspath(wheel_dir),
                    os.fspath(source)], check=True, capture_output=True)
    (wheel,) = wheel_dir.glob("*.whl")
    shutil.copy(wheel, nodes.host_path("node1", f"/root/{wheel.name}"))
    nodes.gnt("gnt-cluster", "copyfile", f"/root/{wheel.name}")
    nodes.gnt("gnt-cluster", "command",
              f"/usr/bin/python3 -m venv --system-site-packages {VENV} && "
              f"{VENV}/bin/pip install -q --no-deps --no-index --force-reinstall --disable-pip-version-check "
              f"/root/{wheel.name}")
    nodes.gnt(COMMAND, "install")
    # The demo is not offered by default (docs/install.md): this cluster offers it.
    nodes.gnt("sh", "-c", f"echo demo >> {CONFIG_DIR}/variants.list")
    on_master_only = nodes.verify()
    nodes.gnt("tar", "-C", "/srv/ganeti/os", "-czf", "/root/cloudimage-os.tar.gz", "cloudimage")
    nodes.gnt("gnt-cluster", "copyfile", "/root/cloudimage-os.tar.gz")
    nodes.gnt("gnt-cluster", "command", f"rm -rf {OS_DIR} && tar -C /srv/ganeti/os -xzf /root/cloudimage-os.tar.gz")
    without_config = nodes.verify()
    nodes.distribute_site_config()
    return Installed(on_master_only, without_config, nodes.verify(), nodes.gnt("gnt-os", "diagnose"))


@pytest.fixture(autouse=True)
def _remove_what_the_test_added(two_nodes: TwoNodes) -> Iterator[None]:
    """Each test starts from the same cluster: its new instances and exports go afterwards."""
    require_owner(OWNER)
    yield from remove_what_the_test_added(two_nodes)
