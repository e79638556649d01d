"""The warm worker on the real cluster: Ganeti's own runs of create, export and import go through it.

The installed OS definition tries the default worker socket; with a worker listening there,
gnt-instance add, gnt-backup export (which reads EXP_SIZE_FD) and gnt-backup import (which feeds
stdin) must run in children of the worker and give the same disks as without it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ganeti_cluster import GanetiCluster

from instance_cloudimage.launch import WORKER_SOCKET

pytestmark = pytest.mark.ganeti

ANCESTRY_HOOK = """#!/bin/sh
p=$$; out=""
while [ "$p" -gt 1 ]; do out="$out $p"; p=$(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f2); done
echo "$out" >> {marker}
"""


@pytest.fixture
def worker(ganeti_cluster: GanetiCluster) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``instance-cloudimage --debug worker`` on the default socket, as the systemd unit would run it."""
    log = ganeti_cluster.work_dir / "worker.log"
    command = Path(sys.executable).parent / "instance-cloudimage"
    with open(log, "wb") as out:
        proc = subprocess.Popen([command, "--debug", "worker"], stderr=out)
    try:
        deadline = time.monotonic() + 60
        while "worker ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc, log
    finally:
        proc.terminate()
        proc.wait(30)
        Path(WORKER_SOCKET).unlink(missing_ok=True)


def test_add_export_import_run_in_the_worker(ganeti_cluster: GanetiCluster,
                                             worker: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, log = worker
    marker = ganeti_cluster.work_dir / "worker-ancestry"
    marker.unlink(missing_ok=True)
    with ganeti_cluster.shipped_hooks_masked("post-write"), \
            ganeti_cluster.site_hooks("pre-fetch", {"10-ancestry": ANCESTRY_HOOK.format(marker=marker)}):
        ganeti_cluster.add_instance("wk1", params={"seed": "none"})
    chain = [int(p) for p in marker.read_text().split()]
    assert proc.pid in chain  # Ganeti's create ran in a child of the worker
    before = sha256_of(ganeti_cluster.disk_path_of("wk1"))
    ganeti_cluster.export("wk1")
    ganeti_cluster.remove_instance("wk1")
    ganeti_cluster.import_("wk1", "wk2")
    text = log.read_text()
    for verb in ("create", "export", "import"):
        assert f"runs {verb} (/srv/ganeti/os/" in text, text
    assert "another install" not in text and "refused" not in text
    # seed=none: nothing for the import to re-seed, so the disk comes back byte for byte.
    assert sha256_of(ganeti_cluster.disk_path_of("wk2")) == before


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
