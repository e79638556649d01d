"""The warm worker: installed OS scripts hand their run to it, and fall back to running themselves.

Everything real: the installed scripts run with a Ganeti environment, the worker is the
``instance-cloudimage worker`` command on a socket in tmp, images are made here with qemu-img.
Where a run happened is read from the process tree (a hook records its ancestors), not from
anything the worker says about itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from instance_cloudimage import launch
from instance_cloudimage.config import Paths
from instance_cloudimage.install import install_os, render_script, render_worker_units
from instance_cloudimage.worker import BadRequest, decode_request

from .conftest import REPO, Site, need_root, need_tools

MIB = 1024 * 1024
VENV_BIN = Path(sys.executable).parent


# --- the request format (no root needed) ------------------------------------------------------

def payload_of(request: bytes) -> bytes:
    assert int.from_bytes(request[:4], "big") == len(request) - 4
    return request[4:]


def test_a_request_decodes_to_what_was_sent() -> None:
    env = {"OS_NAME": "cloudimage", "OSP_USER_DATA": "#cloud-config\nruncmd: [echo a=b]\n", "EMPTY": ""}
    req = decode_request(payload_of(launch.encode_request("id\nx", "export", 0o027, ["/os/export", "a b"],
                                                          env, [11])))
    assert (req.identity, req.verb, req.umask, req.extra_fds, req.argv) == ("id\nx", "export", 0o027, [11],
                                                                           ["/os/export", "a b"])
    assert req.environ == env


NUL = b"\x00"  # spelled out: b"\0022" would be the octal escape \002 followed by "2"


@pytest.mark.parametrize("mangle, why", [
    (lambda p: p.replace(launch.PROTOCOL, b"other/1"), "not an instance-cloudimage request"),
    (lambda p: p.replace(NUL + b"create" + NUL, NUL + b"rm" + NUL), "unknown script"),
    (lambda p: p.replace(NUL + b"22" + NUL, NUL + b"999" + NUL), "malformed umask"),
    (lambda p: p.replace(NUL + b"22" + NUL * 2, NUL + b"22" + NUL + b"1,2" + NUL), "bad descriptor list"),
    (lambda p: p.replace(NUL + b"22" + NUL * 2, NUL + b"22" + NUL + b"11,11" + NUL), "bad descriptor list"),
    (lambda p: p.replace(NUL + b"22" + NUL * 2, NUL + b"22" + NUL + b"x" + NUL), "malformed umask"),
    (lambda p: p.replace(NUL + b"1" + NUL + b"/os", NUL + b"9" + NUL + b"/os"), "out of range"),
    (lambda p: p + NUL + b"NOEQUALS", "malformed environment entry"),
])
def test_a_malformed_request_is_refused(mangle: object, why: str) -> None:
    good = payload_of(launch.encode_request("id", "create", 0o022, ["/os/create"], {"A": "1"}))
    assert decode_request(good).argv == ["/os/create"]
    assert mangle(good) != good  # type: ignore[operator]
    with pytest.raises(BadRequest, match=why):
        decode_request(mangle(good))  # type: ignore[operator]


def test_code_identity_follows_the_package_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "data.txt").write_text("not code")
    before = launch.code_identity(os.fspath(tmp_path))
    (tmp_path / "data.txt").write_text("still not code")
    assert launch.code_identity(os.fspath(tmp_path)) == before
    (tmp_path / "a.py").write_text("x = 22\n")
    assert launch.code_identity(os.fspath(tmp_path)) != before


def test_installed_scripts_start_without_site_and_name_their_worker() -> None:
    text = render_script("create", "/usr/bin/python3", "/tmp/w.sock")
    assert text.startswith("#!/usr/bin/python3 -IS\n")
    assert f"sys.path.insert(0, {os.fspath(REPO)!r})" in text
    assert text.rstrip().endswith("run_script(\"create\", worker='/tmp/w.sock')")
    assert render_script("verify", "/usr/bin/python3").rstrip().endswith('run_script("verify")')


def test_the_worker_units_listen_where_the_scripts_look() -> None:
    assert "ListenStream=/srv/w.sock\n" in render_worker_units("/usr/bin/python3", "/srv/w.sock")[
        "instance-cloudimage-worker.socket"]


def test_the_worker_units_pass_systemd_analyze(tmp_path: Path) -> None:
    units = render_worker_units(sys.executable)
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    assert "ListenStream=/run/instance-cloudimage/worker.sock" in units["instance-cloudimage-worker.socket"]
    assert "KillMode=process" in units["instance-cloudimage-worker.service"]
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    r = subprocess.run(["systemd-analyze", "verify", *(os.fspath(tmp_path / n) for n in units)],
                       capture_output=True, text=True, check=False)
    problems = [line for line in r.stderr.splitlines() if "instance-cloudimage" in line]
    assert not problems, r.stderr


# --- a real worker ------------------------------------------------------------------------------

@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()


def start_worker(sock: Path, log: Path, env: dict[str, str] | None = None,
                 python: list[str] | None = None) -> Worker:
    # --debug: the worker logs each run it takes ("pid N runs create"), which tests read.
    argv = (python or [os.fspath(VENV_BIN / "instance-cloudimage")]) + ["--debug", "worker", "--socket",
                                                                        os.fspath(sock)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stderr=out, env=env)
    deadline = time.monotonic() + 60
    while "worker ready" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the worker did not start: {log.read_text()}")
        time.sleep(0.05)
    return Worker(proc, sock, log)


def stop(worker: Worker) -> None:
    worker.proc.terminate()
    worker.proc.wait(10)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    need_root()
    w = start_worker(tmp_path / "run" / "worker.sock", tmp_path / "worker.log")
    yield w
    stop(w)


ANCESTRY_HOOK = """#!/bin/sh
# Record this hook's ancestors (pids up to init): where the run really happened.
p=$$; out=""
while [ "$p" -gt 1 ]; do out="$out $p"; p=$(sed 's/.*) //' /proc/$p/stat | cut -d' ' -f2); done
echo "$out" >> {marker}
{extra}
"""


@dataclass
class Setup:
    site: Site
    os_dir: Path
    image: Path
    marker: Path

    def env(self, disk: Path, **extra: str) -> dict[str, str]:
        return {"PATH": "/sbin:/bin:/usr/sbin:/usr/bin", "OS_API_VERSION": "20", "OS_NAME": "cloudimage",
                "OS_VARIANT": "plain", "INSTANCE_OS": "cloudimage+plain", "DEBUG_LEVEL": "0",
                "INSTANCE_NAME": "w1.example.org", "HYPERVISOR": "kvm", "DISK_COUNT": "1",
                "DISK_0_PATH": os.fspath(disk), "DISK_0_ACCESS": "rw", "DISK_0_SIZE": "32",
                "DISK_0_BACKEND_TYPE": "file:loop", "NIC_COUNT": "0", "OSP_IMAGE": os.fspath(self.image), **extra}

    def ancestors(self) -> list[list[int]]:
        return [[int(p) for p in line.split()] for line in self.marker.read_text().splitlines()]

    def run(self, verb: str, disk: Path, *, os_dir: Path | None = None, **extra: str
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([(os_dir or self.os_dir) / verb], env=self.env(disk, **extra), cwd=self.os_dir,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)


def make_setup(tmp_path: Path, sock: Path, hook_extra: str = "") -> Setup:
    need_tools("qemu-img")
    site = Site(tmp_path, tmp_path / "etc", tmp_path / "cache", tmp_path / "images")
    (site.config_dir / "variants").mkdir(parents=True)
    site.images.mkdir()
    (site.config_dir / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {site.images}\n")
    (site.config_dir / "variants" / "plain.conf").write_text(
        "[Variant]\nDescription = plain disk\nAgent = none\nSeed = none\nArchitectures = x86_64 aarch64\n"
        "[Image]\nURL = builtin:demo\n")
    marker = tmp_path / "ancestry"
    hook = site.config_dir / "hooks.d" / "pre-fetch.d" / "10-ancestry"
    hook.parent.mkdir(parents=True)
    hook.write_text(ANCESTRY_HOOK.format(marker=marker, extra=hook_extra))
    hook.chmod(0o755)
    image = site.images / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(24 * MIB)
        for at in (0, 5 * MIB + 4096, 20 * MIB):
            f.seek(at)
            f.write(hashlib.shake_256(str(at).encode()).digest(300_000))
    os_dir = tmp_path / "os" / "cloudimage"
    install_os(os_dir, Paths(site.config_dir, site.cache_dir), python=sys.executable, worker=os.fspath(sock))
    return Setup(site, os_dir, image, marker)


def new_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(32 * MIB)
    return path


def same_data(disk: Path, image: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", disk, image],
                          check=False).returncode == 0


@pytest.mark.integration
def test_create_runs_in_a_child_of_the_worker_and_writes_the_same_disk(tmp_path: Path, worker: Worker) -> None:
    s = make_setup(tmp_path, worker.socket)
    r = s.run("create", new_disk(tmp_path / "warm.raw"))
    assert r.returncode == 0, r.stderr
    assert same_data(tmp_path / "warm.raw", s.image)
    assert "cloudimage create: instance w1.example.org installed" in r.stderr
    chain = s.ancestors()[-1]
    assert worker.proc.pid in chain  # the hook ran under the worker, not under the script

    stop(worker)  # no worker: the same script runs itself, with the same output
    cold = s.run("create", new_disk(tmp_path / "cold.raw"))
    assert cold.returncode == 0, cold.stderr
    assert worker.proc.pid not in s.ancestors()[-1]
    assert same_data(tmp_path / "cold.raw", s.image)
    assert cold.stderr == r.stderr.replace("warm.raw", "cold.raw")


BARRIER = """touch {arrived}/$$
tries=0
while [ "$(ls {arrived} | wc -l)" -lt {n} ]; do
    tries=$((tries + 1)); [ "$tries" -gt 600 ] && echo "only $(ls {arrived} | wc -l) runs at once" >&2 && exit 1
    sleep 0.05
done
"""


@pytest.mark.integration
def test_runs_started_together_run_at_once_each_in_its_own_child(tmp_path: Path, worker: Worker) -> None:
    """Ganeti runs jobs for several instances of a node in parallel.  Each hook waits until all
    runs reached it, so a worker serving one run at a time fails the test instead of slowing it."""
    n = 3
    arrived = tmp_path / "arrived"
    arrived.mkdir()
    s = make_setup(tmp_path, worker.socket, hook_extra=BARRIER.format(arrived=arrived, n=n))
    qcow2 = s.site.images / "disk.qcow2"  # qemu-img info too, and its answer kept, by runs at once
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", s.image, qcow2], check=True)
    disks = [new_disk(tmp_path / f"d{i}.raw") for i in range(n)]
    procs = [subprocess.Popen([s.os_dir / "create"], cwd=s.os_dir,
                              env=s.env(d, INSTANCE_NAME=f"w{i}.example.org", OSP_IMAGE=os.fspath(qcow2)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i, d in enumerate(disks)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, errs
    for i, (disk, err) in enumerate(zip(disks, errs, strict=True)):
        assert same_data(disk, s.image)
        assert f"instance w{i}.example.org installed" in err
    children = {chain[chain.index(worker.proc.pid) - 1] for chain in s.ancestors()}
    assert len(children) == n and worker.proc.pid not in children
    assert worker.log_text().count("runs create") == n


@pytest.mark.integration
def test_a_refused_run_is_the_same_one_line_and_exit_code(tmp_path: Path, worker: Worker) -> None:
    s = make_setup(tmp_path, worker.socket)
    disk = new_disk(tmp_path / "d.raw")
    warm = s.run("create", disk, OSP_IMAGE="/etc/shadow")
    assert "runs create" in worker.log_text()  # refused in the worker's child, not by a fallback
    stop(worker)
    cold = s.run("create", disk, OSP_IMAGE="/etc/shadow")
    assert warm.returncode == cold.returncode != 0
    assert warm.stderr == cold.stderr
    assert len([line for line in warm.stderr.splitlines() if "error" in line]) == 1, warm.stderr
    assert "Traceback" not in warm.stderr


@pytest.mark.integration
def test_export_and_import_stream_through_the_worker(tmp_path: Path, worker: Worker) -> None:
    s = make_setup(tmp_path, worker.socket)
    source = new_disk(tmp_path / "src.raw")
    assert s.run("create", source).returncode == 0
    size_r, size_w = os.pipe()
    env = {**s.env(source), "EXPORT_DEVICE": os.fspath(source), "EXPORT_DISK_PATH": os.fspath(source),
           "EXPORT_INDEX": "0", "EXP_SIZE_FD": str(size_w)}
    with open(tmp_path / "stream", "wb") as out:
        r = subprocess.run([s.os_dir / "export"], env=env, cwd=s.os_dir, stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.PIPE, pass_fds=(size_w,), check=False)
    os.close(size_w)
    announced = os.read(size_r, 100)
    os.close(size_r)
    assert r.returncode == 0, r.stderr
    assert announced.endswith(b"\n") and int(announced) > 0  # EXP_SIZE_FD reached the worker's child
    target = new_disk(tmp_path / "dst.raw")
    env = {**s.env(target), "IMPORT_DEVICE": os.fspath(target), "IMPORT_DISK_PATH": os.fspath(target),
           "IMPORT_INDEX": "0"}
    with open(tmp_path / "stream", "rb") as stream:
        r = subprocess.run([s.os_dir / "import"], env=env, cwd=s.os_dir, stdin=stream, capture_output=True,
                           check=False)
    assert r.returncode == 0, r.stderr
    assert same_data(target, s.image)
    assert b"error" not in r.stderr
    log = worker.log_text()
    assert "runs export" in log and "runs import" in log  # both went through the worker


def process_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def wait_for_hook(marker: Path, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while not marker.exists() or not marker.read_text().strip():
        assert time.monotonic() < deadline, "the hook never ran"
        time.sleep(0.05)
    return [int(p) for p in marker.read_text().split()]


@pytest.mark.integration
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_script_stops_its_run_in_the_worker(tmp_path: Path, worker: Worker, how: int) -> None:
    s = make_setup(tmp_path, worker.socket, hook_extra="exec sleep 120")
    disk = new_disk(tmp_path / "d.raw")
    proc = subprocess.Popen([s.os_dir / "create"], env=s.env(disk), cwd=s.os_dir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chain = wait_for_hook(s.marker)
    hook, child = chain[0], chain[chain.index(worker.proc.pid) - 1]
    proc.send_signal(how)  # Ganeti's way of cancelling a job (SIGTERM), or a harder kill
    _, err = proc.communicate(timeout=30)
    assert process_gone(child) and process_gone(hook)
    assert proc.returncode != 0
    if how == signal.SIGTERM:
        assert b"error: interrupted" in err
    assert worker.proc.poll() is None  # the worker itself goes on serving
    env = {k: v for k, v in s.env(disk).items() if k != "OSP_IMAGE"}
    r = subprocess.run([s.os_dir / "verify", "parameters"], env=env, cwd=s.os_dir, capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr


@pytest.mark.integration
def test_a_worker_running_other_code_leaves_the_run_to_the_script(tmp_path: Path, worker: Worker) -> None:
    """A script of another install: the worker says stale, warns, and the script runs itself."""
    copy = tmp_path / "other" / "instance_cloudimage"
    shutil.copytree(REPO / "instance_cloudimage", copy, ignore=shutil.ignore_patterns("__pycache__"))
    s = make_setup(tmp_path, worker.socket)
    script = (s.os_dir / "create").read_text().replace(repr(os.fspath(REPO)), repr(os.fspath(copy.parent)))
    other = tmp_path / "os" / "other"
    shutil.copytree(s.os_dir, other)
    (other / "create").write_text(script)
    r = s.run("create", new_disk(tmp_path / "d.raw"), os_dir=other)
    assert r.returncode == 0, r.stderr
    assert worker.proc.pid not in s.ancestors()[-1]
    assert "another install or interpreter ran itself" in worker.log_text()
    assert worker.proc.poll() is None


@pytest.mark.integration
def test_a_worker_whose_files_changed_reloads_them(tmp_path: Path) -> None:
    need_root()
    copy = tmp_path / "pkg" / "instance_cloudimage"
    shutil.copytree(REPO / "instance_cloudimage", copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.fspath(copy.parent)}
    w = start_worker(tmp_path / "run" / "w.sock", tmp_path / "worker.log", env=env,
                     python=[sys.executable, "-P", "-m", "instance_cloudimage"])
    try:
        s = make_setup(tmp_path, w.socket)
        script = (s.os_dir / "create").read_text().replace(repr(os.fspath(REPO)), repr(os.fspath(copy.parent)))
        (s.os_dir / "create").write_text(script)
        assert s.run("create", new_disk(tmp_path / "a.raw")).returncode == 0
        assert w.proc.pid in s.ancestors()[-1]
        (copy / "errors.py").write_text((copy / "errors.py").read_text() + "\n# an upgrade\n")
        r = s.run("create", new_disk(tmp_path / "b.raw"))  # stale: runs itself, the worker re-executes
        assert r.returncode == 0, r.stderr
        assert w.proc.pid not in s.ancestors()[-1]
        deadline = time.monotonic() + 60
        while w.log_text().count("worker ready") < 2:
            assert time.monotonic() < deadline and w.proc.poll() is None, w.log_text()
            time.sleep(0.05)
        assert "re-executing the worker to load it" in w.log_text()
        assert s.run("create", new_disk(tmp_path / "c.raw")).returncode == 0
        assert w.proc.pid in s.ancestors()[-1]  # same pid (exec), new code, serving again
    finally:
        stop(w)


@pytest.mark.integration
def test_only_the_workers_own_user_may_connect(tmp_path: Path) -> None:
    need_root()
    need_tools("setpriv")
    # A socket other users can reach (pytest's tmp is 0700), opened up so that the peer check is
    # what refuses them.
    base = Path(tempfile.mkdtemp(prefix="cloudimage-worker-"))
    try:
        base.chmod(0o755)
        worker = start_worker(base / "run" / "w.sock", tmp_path / "worker.log")
        try:
            os.chmod(worker.socket.parent, 0o755)
            os.chmod(worker.socket, 0o666)
            probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                     "try:\n  s.sendall(b'x'*8)\n  print(repr(s.recv(100)))\n"
                     "except (BrokenPipeError, ConnectionResetError):\n  print(repr(b''))\n")
            r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                "-I", "-c", probe, os.fspath(worker.socket)],
                               capture_output=True, text=True, check=False)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "b''"  # closed without a word
            assert "refused a connection from uid 65534" in worker.log_text()
        finally:
            stop(worker)
    finally:
        shutil.rmtree(base)


@pytest.mark.integration
def test_a_second_worker_on_the_same_socket_is_refused(tmp_path: Path, worker: Worker) -> None:
    r = subprocess.run([VENV_BIN / "instance-cloudimage", "worker", "--socket", worker.socket],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        f"instance-cloudimage: error: cannot listen on {worker.socket}: another worker is listening there"]
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(os.fspath(worker.socket))  # the first one still is


# --- handing over, and giving up on it ----------------------------------------------------------

def test_descriptors_the_worker_cannot_take_keep_the_run_here() -> None:
    r, w = os.pipe()
    try:
        assert launch.named_fds({}) == []
        assert launch.named_fds({"EXP_SIZE_FD": str(w)}) == [w]
        assert launch.named_fds({"EXP_SIZE_FD": "\u00b2"}) is None  # isdigit() but no int()
        assert launch.named_fds({"EXP_SIZE_FD": "99"}) is None  # not open
        assert launch.named_fds({"EXP_SIZE_FD": str(launch.NAMED_FD_LIMIT + 5)}) is None
    finally:
        os.close(r)
        os.close(w)


def test_a_worker_that_never_answers_leaves_the_run_to_the_script(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "HANDOVER_TIMEOUT", 0.5)
    path = tmp_path / "wedged.sock"
    with socket.socket(socket.AF_UNIX) as wedged:
        wedged.bind(os.fspath(path))
        wedged.listen(1)
        start = time.monotonic()
        assert launch.delegate("verify", os.fspath(path), ["verify"], {"OS_API_VERSION": "20"}) is None
        assert time.monotonic() - start < 10


@pytest.mark.integration
def test_a_child_never_runs_without_the_scripts_go_ahead(tmp_path: Path, worker: Worker) -> None:
    """The script gave up after the child said its pid (a timeout): the child must not run as well."""
    s = make_setup(tmp_path, worker.socket)
    sock = launch.connect(os.fspath(worker.socket))
    assert sock is not None
    env = s.env(new_disk(tmp_path / "d.raw"))
    assert launch.send_request(sock, launch.encode_request(launch.code_identity(), "create", 0o022,
                                                           [os.fspath(s.os_dir / "create")], env), [])
    first = launch.Replies(sock).next_line()
    assert first is not None and first.startswith(b"pid ")
    child = int(first[4:])
    sock.close()  # no go-ahead
    assert process_gone(child)
    assert not s.marker.exists()  # the pre-fetch hook never ran
