"""What the single-node and the two-node cluster tests share: running commands, the host checks,
and the one Ganeti test cluster this machine can have at a time.

The two clusters cannot run side by side, and one pytest session runs both suites
(tests/ganeti/cluster before tests/ganeti/twonode, pytest's order).  ``occupy`` hands the machine
over: the session takes the machine lock once (another session waits for it), and a suite that
starts its cluster first stops the other suite's, so each cluster is set up once per session.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

LOCK_FILE = Path("/run/lock/instance-cloudimage-ganeti-tests.lock")
LOCK_TIMEOUT = 1800.0
DEFAULT_TIMEOUT = 600.0
SET_ASIDE = ".before-cluster-tests"


@dataclass(frozen=True)
class GntResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together: Ganeti prints job errors on either."""
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode})\n{self.output}"


class GntError(AssertionError):
    """A Ganeti command failed where the test expected success."""

    def __init__(self, result: GntResult) -> None:
        super().__init__(result.describe())
        self.result = result


def run_logged(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               timeout: float = DEFAULT_TIMEOUT, cwd: str | None = None) -> GntResult:
    """Run ``argv`` with stdin closed and its output captured through files, so that a daemon
    that keeps an inherited descriptor open can never hang a test."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                              env=dict(env) if env is not None else None, timeout=timeout, cwd=cwd,
                              check=False)
        out.seek(0)
        err.seek(0)
        return GntResult(tuple(argv), proc.returncode, out.read().decode(errors="replace"),
                         err.read().decode(errors="replace"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def why_no_cluster() -> str | None:
    """Why this machine cannot run the cluster tests, or None."""
    if sys.platform != "linux":
        return "Ganeti tests need Linux"
    if os.geteuid() != 0:
        return "Ganeti tests need root (run: sudo .venv/bin/pytest)"
    for tool in ("/usr/sbin/gnt-cluster", "/usr/lib/ganeti/daemon-util"):
        if not os.path.exists(tool):
            return f"Ganeti is not installed ({tool} missing; run: sudo .ci/setup)"
    return None


def skip_or_fail(reason: str) -> None:
    """Skip a cluster test with the reason; under CI (CI=true) fail, so CI never passes by skipping."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: Ganeti tests must run in CI)", pytrace=False)
    pytest.skip(reason)


def saved_copy(directory: Path) -> Path:
    """Where ``set_aside`` keeps ``directory``: a dot name, which Ganeti's OS search skips."""
    return directory.with_name(f".{directory.name}{SET_ASIDE}")


def set_aside(directory: Path) -> None:
    """Move a directory the tests take over out of the way (after a killed session: put it back first)."""
    saved = saved_copy(directory)
    if saved.exists():
        put_back(directory)
    if directory.exists():
        directory.rename(saved)


def put_back(directory: Path) -> None:
    saved = saved_copy(directory)
    shutil.rmtree(directory, ignore_errors=True)
    if saved.exists():
        saved.rename(directory)


def mark_ganeti(items: list[pytest.Item], directory: Path) -> None:
    """Mark every test below ``directory`` ``ganeti`` (a conftest's collection hook)."""
    for item in items:
        if directory in Path(item.path).parents:
            item.add_marker(pytest.mark.ganeti)


def loop_devices_of(directory: Path) -> list[str]:
    """Loop devices whose backing file is inside ``directory``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if backing.read_text().strip().startswith(os.fspath(directory) + "/"):
            found.append(backing.parent.parent.name)
    return found


class Cluster(Protocol):
    def instances(self) -> list[str]: ...
    def exports(self) -> set[str]: ...
    def remove_instance(self, name: str, check: bool = True) -> GntResult: ...
    def remove_export(self, name: str, check: bool = True) -> GntResult: ...


def remove_what_the_test_added(cluster: Cluster) -> Iterator[None]:
    """The body of an autouse fixture: the instances and exports a test added go afterwards."""
    instances_before, exports_before = set(cluster.instances()), cluster.exports()
    yield
    for name in sorted(set(cluster.instances()) - instances_before):
        cluster.remove_instance(name, check=False)
    for name in sorted(cluster.exports() - exports_before):
        cluster.remove_export(name, check=False)


class _Machine:
    """This session's hold on the machine: the lock's descriptor, and which suite's cluster runs."""

    def __init__(self) -> None:
        self.lock_fd: int | None = None
        self.owner: str | None = None
        self.stop: Callable[[], None] | None = None


_machine = _Machine()


def _acquire_lock() -> int:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                pytest.fail(f"another test session has held {LOCK_FILE} for {LOCK_TIMEOUT:.0f}s", pytrace=False)
            time.sleep(2)


def occupy(owner: str, stop: Callable[[], None]) -> None:
    """Make ``owner``'s cluster the machine's: the lock (held until the session ends), and the
    previous owner's cluster stopped first.  ``stop`` stops ``owner``'s cluster; ``vacate`` or
    the next ``occupy`` calls it once."""
    if _machine.lock_fd is None:
        _machine.lock_fd = _acquire_lock()
    vacate()
    _machine.owner, _machine.stop = owner, stop


def vacate(owner: str | None = None) -> None:
    """Stop the running cluster (only ``owner``'s, when given); nothing when it is stopped already."""
    if _machine.stop is None or (owner is not None and owner != _machine.owner):
        return
    stop, _machine.owner, _machine.stop = _machine.stop, None, None
    stop()


T = TypeVar("T")


def run_on_the_machine(owner: str, life: Generator[T, None, None]) -> Iterator[T]:
    """The body of a session fixture: ``life`` (a cluster's whole life as a generator, torn down
    by its ``close()``) runs once it owns the machine, and is closed at the end or when another
    suite takes the machine over."""
    occupy(owner, life.close)
    yield next(life)
    vacate(owner)


def require_owner(owner: str) -> None:
    """Fail a test whose cluster was stopped for the other suite (tests run out of pytest's order)."""
    if _machine.owner != owner:
        pytest.fail(f"the {owner} cluster was stopped for another suite's: run tests/ganeti/cluster "
                    "before tests/ganeti/twonode (pytest's order)", pytrace=False)
