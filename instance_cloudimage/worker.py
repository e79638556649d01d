"""The warm worker: imports the whole package once, then forks a child for every OS script run.

launch.py (the scripts' front door) connects to its socket and hands over the script's verb,
argv, environment, umask, stdin/stdout/stderr and working directory; the child becomes that
script, runs the same ``os_script_main`` a cold script runs, and reports its exit code.  What a
cold run pays on every script (a new interpreter, ~0.1 s of imports, libmagic's database) the
worker pays once.

Safety: only processes of the worker's own user may connect (SO_PEERCRED, on top of the
socket's 0600 mode in a 0700 directory), since a run does everything root does.  The parent
stays single-threaded so that fork is safe, keeps no per-run state, and never reads a request
itself.  A client built from other code (an upgrade, another install) gets "stale" and runs the
script itself; a worker whose own files changed on disk re-executes itself to load them.
"""

from __future__ import annotations

import fcntl
import gc
import importlib
import logging
import os
import pkgutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

from .errors import ConfigError
from .launch import (
    FD_COUNT,
    GO,
    HANDOVER_TIMEOUT,
    MAX_EXTRA_FDS,
    MAX_REQUEST,
    NAMED_FD_LIMIT,
    PROTOCOL,
    code_identity,
)

log = logging.getLogger(__name__)

VERBS = ("create", "import", "export", "rename", "verify")
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request once connected


@dataclass(frozen=True)
class Request:
    identity: str
    verb: str
    umask: int
    extra_fds: list[int]  # where the descriptors after the first FD_COUNT go in the child
    argv: list[str]
    environ: dict[str, str]


class BadRequest(Exception):
    pass


def decode_request(payload: bytes) -> Request:
    """The fields launch.encode_request wrote; BadRequest for anything else."""
    fields = payload.split(b"\0")
    if len(fields) < 6 or fields[0] != PROTOCOL:
        raise BadRequest("not an instance-cloudimage request")
    verb = fields[2].decode("ascii", "replace")
    if verb not in VERBS:
        raise BadRequest(f"unknown script {verb!r}")
    try:
        umask, argc = int(fields[3], 8), int(fields[5])
        extra = [int(n) for n in fields[4].split(b",")] if fields[4] else []
    except ValueError:
        raise BadRequest("malformed umask, descriptor list or argument count") from None
    if not 0 <= umask <= 0o777 or not 0 < argc <= len(fields) - 6:
        raise BadRequest("umask or argument count out of range")
    if len(extra) > MAX_EXTRA_FDS or len(set(extra)) != len(extra) or any(not 2 < n < NAMED_FD_LIMIT for n in extra):
        raise BadRequest("bad descriptor list")
    argv = [os.fsdecode(a) for a in fields[6:6 + argc]]
    environ: dict[str, str] = {}
    for item in fields[6 + argc:]:
        name, sep, value = item.partition(b"=")
        if not sep or not name:
            raise BadRequest("malformed environment entry")
        environ[os.fsdecode(name)] = os.fsdecode(value)
    return Request(fields[1].decode("utf-8", "replace"), verb, umask, extra, argv, environ)


def receive_request(conn: socket.socket) -> tuple[Request, list[int]]:
    """Read one request and the descriptors sent with it (launch.send_request)."""
    conn.settimeout(REQUEST_TIMEOUT)
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, FD_COUNT + MAX_EXTRA_FDS)
    try:
        if len(fds) < FD_COUNT:
            raise BadRequest(f"expected at least {FD_COUNT} descriptors, got {len(fds)}")
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            if len(data) >= 4 and int.from_bytes(data[:4], "big") > MAX_REQUEST:
                raise BadRequest("request too large")
            chunk = conn.recv(1 << 20)
            if not chunk:
                raise BadRequest("request cut short")
            data += chunk
        size = int.from_bytes(data[:4], "big")
        request = decode_request(data[4:4 + size])
        if len(fds) != FD_COUNT + len(request.extra_fds):
            raise BadRequest(f"{len(fds)} descriptors for {len(request.extra_fds)} named ones")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return request, fds


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


def move_high(fd: int) -> int:
    """``fd`` moved to a number above any the client may name (close-on-exec there)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, NAMED_FD_LIMIT)
    os.close(fd)
    return high


def become_client(request: Request, fds: list[int]) -> None:
    """Take on the client's descriptors, directory, umask, argv and environment."""
    # A received descriptor may sit on a number another one must take: all go above the targets first.
    high = [move_high(fd) for fd in fds]
    os.fchdir(high[3])
    for target, fd in zip([0, 1, 2, *request.extra_fds], high[:3] + high[FD_COUNT:], strict=True):
        os.dup2(fd, target)
    for fd in high:
        os.close(fd)
    os.umask(request.umask)
    os.environ.clear()  # the script's subprocesses (hooks, qemu-img) inherit what Ganeti gave it
    os.environ.update(request.environ)
    sys.argv = list(request.argv)


def receive_go(conn: socket.socket) -> bool:
    """The script's go-ahead (launch.GO), sent once it has given up any idea of running itself."""
    data = b""
    conn.settimeout(HANDOVER_TIMEOUT + 5)
    try:
        while len(data) < len(GO):
            chunk = conn.recv(len(GO) - len(data))
            if not chunk:
                return False
            data += chunk
    except OSError:
        return False
    conn.settimeout(None)
    return data == GO


def watch_client(conn: socket.socket) -> None:
    """SIGTERM ourselves when the client goes away (Ganeti killed the script), as a cold run would die."""
    def wait() -> None:
        try:
            conn.recv(1)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="client-watch", daemon=True).start()


def run_child(conn: socket.socket, identity: str, worker: int) -> NoReturn:
    """The forked child: one script run, then exit; never back into the parent's accept loop."""
    code = 1
    try:
        code = serve_request(conn, identity, worker)
    except BaseException as e:  # the script's own errors were handled by its guarded(); this is ours
        log.error("internal error in a worker child: %s: %s (please report this)", type(e).__name__, e)
    finally:
        os._exit(code)


def serve_request(conn: socket.socket, identity: str, worker: int) -> int:
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_DFL)  # SIGCHLD was ignored in the parent: subprocess needs it back
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as in any script
    os.setsid()  # stopping or restarting the worker must not stop the runs it started
    conn = socket.socket(fileno=move_high(conn.detach()))
    try:
        request, fds = receive_request(conn)
    except (OSError, BadRequest) as e:
        log.warning("refused a request: %s", e)
        return 1
    if request.identity != identity:
        conn.sendall(b"stale\n")
        if code_identity() != identity and os.getppid() == worker:  # our own files changed: reload them
            os.kill(worker, signal.SIGUSR1)
        else:
            log.warning("a %s script of another install or interpreter ran itself: this worker serves "
                        "%s only", request.verb, os.path.dirname(__file__))
        return 0
    log.debug("pid %d runs %s (%s)", os.getpid(), request.verb, request.argv[0])  # in the worker's own log
    become_client(request, fds)
    conn.sendall(b"pid %d\n" % os.getpid())
    if not receive_go(conn):
        return 1  # the script gave up waiting and runs itself: this child must not run too
    watch_client(conn)
    from .cli import finish_streams, os_script_main

    code = os_script_main(request.verb, os.environ, request.argv)
    # The client exits once it reads the code, and the watcher would then SIGTERM a finished run.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = finish_streams(code)
    try:
        conn.sendall(b"exit %d\n" % code)
    except OSError:
        pass
    return code


def preload_package() -> int:
    """Import every module of the package and warm libmagic; return how many modules loaded."""
    package = __name__.rsplit(".", 1)[0]
    names = [m.name for m in pkgutil.iter_modules([os.path.dirname(__file__)])
             if m.name != "__main__"]  # which would run the command again
    for name in names:
        importlib.import_module(f"{package}.{name}")
    from .detect import describe_content

    describe_content(b"\0" * 512)  # loads libmagic's database (tens of ms) into the handle children share
    return len(names)


def serve(listener: socket.socket) -> NoReturn:
    """Accept runs forever; re-execute on SIGUSR1 (new code on disk) keeping the listening socket."""
    identity = code_identity()  # before loading: files replaced meanwhile show as a change below
    count = preload_package()
    if threading.active_count() != 1:
        raise ConfigError("the worker started threads while loading; forking it would be unsafe")
    worker = os.getpid()

    # The handlers act at once rather than raise: an exception from a handler that runs inside
    # fork()'s at-fork callbacks is printed and dropped, and the worker would go on.
    def stop(signum: int, frame: FrameType | None) -> None:
        os.write(2, b"instance-cloudimage: worker stopped\n")
        os._exit(0)

    def reload(signum: int | None = None, frame: FrameType | None = None) -> None:
        os.write(2, b"instance-cloudimage: the package changed on disk: re-executing the worker to load it\n")
        # Ignored stays ignored across exec: more stale children's SIGUSR1 must not kill the new one.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        os.set_inheritable(listener.fileno(), True)
        debug = ["--debug"] if log.isEnabledFor(logging.DEBUG) else []
        os.execv(sys.executable, [sys.executable, "-P", "-m", __name__.rsplit(".", 1)[0], *debug, "worker",
                                  "--fd", str(listener.fileno())])

    if code_identity() != identity:
        reload()
    # What is loaded now lives as long as the worker: out of the collector's reach, a child's
    # first collection does not touch (and so copy) every page the parent's objects are on.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished runs
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    signal.signal(signal.SIGUSR1, reload)
    log.info("worker ready: %d modules loaded, pid %d", count, worker)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as e:  # EMFILE and the like: that client runs its script itself
            log.warning("cannot accept a run: %s", e.strerror)
            time.sleep(0.1)
            continue
        with conn:
            uid = peer_uid(conn)
            if uid != os.geteuid():
                log.warning("refused a connection from uid %d: runs are for uid %d only", uid, os.geteuid())
                continue
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # or each child would write the parent's buffer again
            try:
                child = os.fork()
            except OSError as e:  # EAGAIN under TasksMax: that client runs its script itself
                log.warning("cannot fork a run: %s", e.strerror)
                continue
            if child == 0:
                try:
                    listener.close()
                finally:
                    run_child(conn, identity, worker)


def open_listener(path: Path) -> socket.socket:
    """A listening socket at ``path``, usable by root only: 0600 in a 0700 directory."""
    try:
        if not path.parent.is_dir():  # an existing directory keeps its mode: it may be /run or /tmp
            path.parent.mkdir(mode=0o700, parents=True)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ConfigError(f"cannot listen on {path}: it exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(os.fspath(path)) == 0:
                    raise ConfigError(f"cannot listen on {path}: another worker is listening there")
            path.unlink()  # a socket no worker listens on any more
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(os.fspath(path))
        finally:
            os.umask(old)
        listener.listen(64)
        return listener
    except OSError as e:
        raise ConfigError(f"cannot listen on {path}: {e.strerror}; is another worker running?") from None


def listener_from_fd(fd: int) -> socket.socket:
    listener = socket.socket(fileno=fd)
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        raise ConfigError(f"descriptor {fd} is not a listening UNIX stream socket")
    os.set_inheritable(fd, False)
    return listener
