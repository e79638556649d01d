"""A real single-node Ganeti cluster for the tests in this directory.

The session-scoped ``ganeti_cluster`` fixture builds the cluster with cluster.sh, gives it our
OS definition, and tears everything down at the end (or earlier, when the two-node suite in
tests/ganeti/twonode takes the machine: tests/support/ganeti_host.occupy), also when tests
fail: instances and exports removed, cluster destroyed, daemons stopped, bridge, /etc/hosts and
file-storage-paths restored.

Which OS definition the cluster runs is chosen by INSTANCE_CLOUDIMAGE_CLUSTER_INSTALL:

- ``venv`` (the default): the environment running the tests installs it with
  ``instance-cloudimage install`` into /srv/ganeti/os/cloudimage, config and cache in a temporary
  directory (an installed package's OS definition is set aside meanwhile);
- ``package``: the installed Debian package's /usr/share/ganeti/os/cloudimage as it is, with the
  config and cache directories baked into it (/etc/ganeti/instance-cloudimage and
  /var/cache/instance-cloudimage); the fixture sets the existing ones aside and puts them back
  afterwards.

Either way the config directory gets the same test site: defaults.conf, the demo-site variant and
a variants.list offering the distribution variants plus demo and demo-site.

Every test here is marked ``ganeti``.  Without root or without Ganeti the tests are skipped with
the reason; under CI (``CI=true``) they fail instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from ganeti_cluster import (
    BRIDGE,
    CLUSTER_SH,
    DOMAIN,
    LOOP_IMG_DIR,
    NBD_IMG_DIR,
    NBD_RUN_DIR,
    OS_DIR,
    OS_LOG_DIR,
    SITE_VARIANT,
    SITE_VARIANT_USER,
    GanetiCluster,
    GntResult,
    gnt,
    run_logged,
)

from instance_cloudimage.cli.install import PACKAGE_OS_DIR
from instance_cloudimage.ganeti.variants import default_offered, render_variants_list
from instance_cloudimage.runtime.siteconfig import Paths, installed_paths
from tests.support.ganeti_host import (
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

HOSTS = Path("/etc/hosts")
INSTALL_VARIABLE = "INSTANCE_CLOUDIMAGE_CLUSTER_INSTALL"
PACKAGE = "ganeti-instance-cloudimage"
OWNER = "single-node"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_ganeti(items, Path(__file__).parent)


def bridge_exists() -> bool:
    return Path("/sys/class/net", BRIDGE).exists()


def run_cluster_sh(action: str, log: Path) -> GntResult:
    result = run_logged(["bash", os.fspath(CLUSTER_SH), action], env={
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}, cwd="/")
    with open(log, "a") as f:
        f.write(result.describe() + "\n")
    return result


def tested_install() -> str:
    value = os.environ.get(INSTALL_VARIABLE, "venv")
    if value not in ("venv", "package"):
        pytest.fail(f"{INSTALL_VARIABLE} must be venv or package, not {value!r}", pytrace=False)
    return value


def why_no_package() -> str | None:
    status = run_logged(["dpkg-query", "-W", "-f=${Status}", PACKAGE]).stdout
    if status != "install ok installed" or not (PACKAGE_OS_DIR / "create").exists():
        return (f"{INSTALL_VARIABLE}=package, but {PACKAGE} is not installed "
                "(.ci/build-deb, then apt-get install ./build/deb/*.deb)")
    return None


def write_test_site(paths: Paths, image_dir: Path) -> None:
    config_dir = paths.config_dir
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {image_dir}\n")
    # A site's own variant, listed by the installed OS like the shipped ones: the demo image with
    # a default user, which password_hash needs.
    (config_dir / "variants").mkdir()
    (config_dir / "variants" / f"{SITE_VARIANT}.conf").write_text(
        "[Variant]\nDescription = The demo image as a site variant, with a default user\nAgent = cloud-init\n"
        f"DefaultUser = {SITE_VARIANT_USER}\nArchitectures = x86_64 aarch64\n"
        "[Image]\nURL = builtin:demo\nFormat = qcow2\n")
    # What a package install offers, plus the demo variants the tests use.
    offered = sorted({*default_offered(paths), "demo", SITE_VARIANT})
    paths.variants_list.write_text(render_variants_list(offered, paths.variants_list))


def instance_cloudimage_command() -> str:
    """The console script of the environment running the tests (the project's venv)."""
    beside = Path(sys.executable).parent / "instance-cloudimage"
    if beside.exists():
        return os.fspath(beside)
    found = shutil.which("instance-cloudimage")
    if found is None:
        pytest.fail("instance-cloudimage is not installed in this environment (pip install -e .)")
    return found


@pytest.fixture(scope="session")
def ganeti_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GanetiCluster]:
    reason = why_no_cluster()
    if reason:
        skip_or_fail(reason)
    # The two-node suite's cluster, if one runs, stops first.
    yield from run_on_the_machine(OWNER, _session(tmp_path_factory.mktemp("ganeti")))


def _session(work: Path) -> Generator[GanetiCluster, None, None]:
    """The cluster's whole life as a generator: its ``close()`` tears it down."""
    log = work / "cluster.log"
    status = run_cluster_sh("status", log).returncode
    if status == 2:
        skip_or_fail("a Ganeti cluster not made by the tests is configured on this machine")
    if status == 0:  # left over from a killed session
        run_cluster_sh("teardown", log)
    yield from _run_cluster(work, log)


def _run_cluster(work: Path, log: Path) -> Iterator[GanetiCluster]:
    install = tested_install()
    if install == "package":
        reason = why_no_package()
        if reason:
            skip_or_fail(reason)
        os_dir = PACKAGE_OS_DIR
        paths = installed_paths(os.fspath(os_dir / "create"))
    else:
        os_dir = OS_DIR
        paths = Paths(work / "etc", work / "cache")
    image_dir = work / "images"
    image_dir.mkdir()
    logs_before = frozenset(OS_LOG_DIR.iterdir()) if OS_LOG_DIR.is_dir() else frozenset()
    hosts_before = HOSTS.read_text()
    bridge_before = bridge_exists()
    taken_over: list[Path] = []  # the package's directories set aside, to put back
    try:
        # package: its site directories become the tests'.  venv: an installed package's OS
        # definition goes out of Ganeti's sight, as the copy in /srv/ganeti/os would shadow it
        # and Ganeti 3.0's gnt-os diagnose fails on a shadowed OS (a 6- vs 7-tuple unpacking).
        for directory in (paths.config_dir, paths.cache_dir) if install == "package" else (PACKAGE_OS_DIR,):
            set_aside(directory)
            taken_over.append(directory)
        write_test_site(paths, image_dir)
        result = run_cluster_sh("setup", log)
        if result.returncode != 0:
            pytest.fail(f"cluster setup failed:\n{result.describe()}", pytrace=False)
        # /srv/ganeti/os comes first in Ganeti's search path: a copy there would shadow the package.
        shutil.rmtree(OS_DIR, ignore_errors=True)
        if install == "venv":
            installed = run_logged([instance_cloudimage_command(), "install", "--os-dir", os.fspath(OS_DIR),
                                    "--config-dir", os.fspath(paths.config_dir),
                                    "--cache-dir", os.fspath(paths.cache_dir)])
            if installed.returncode != 0:
                pytest.fail(f"instance-cloudimage install failed:\n{installed.describe()}", pytrace=False)
        node = gnt("gnt-cluster", "getmaster").stdout.strip()
        assert node.endswith("." + DOMAIN), node
        yield GanetiCluster(node=node, config_dir=paths.config_dir, cache_dir=paths.cache_dir,
                            image_dir=image_dir, work_dir=work, os_dir=os_dir, logs_before=logs_before)
    finally:
        shutil.rmtree(OS_DIR, ignore_errors=True)
        for directory in taken_over:
            put_back(directory)
        result = run_cluster_sh("teardown", log)
        if result.returncode != 0:
            pytest.fail(f"cluster teardown failed (see {log}):\n{result.describe()}", pytrace=False)
        leftovers = [what for what, left in (
            ("/etc/hosts is not restored", HOSTS.read_text() != hosts_before),
            (f"bridge {BRIDGE} is left", bridge_exists() and not bridge_before),
            ("the cluster configuration is left", Path("/var/lib/ganeti/config.data").exists()),
            ("loop devices of the loopfile provider are left", bool(loop_devices_of(LOOP_IMG_DIR))),
            ("volumes or qemu-nbd servers of the nbdfile provider are left",
             NBD_IMG_DIR.exists() or NBD_RUN_DIR.exists()),
        ) if left]
        if leftovers:
            pytest.fail(f"cluster teardown left state behind: {'; '.join(leftovers)} (see {log})", pytrace=False)


@pytest.fixture(autouse=True)
def _remove_what_the_test_added(ganeti_cluster: GanetiCluster) -> Iterator[None]:
    """Each test starts from the same cluster: its new instances and exports go afterwards."""
    require_owner(OWNER)
    yield from remove_what_the_test_added(ganeti_cluster)
