"""The OS scripts' front door: hand the run to the warm worker (worker.py) when one listens,
otherwise run it in this process.

Ganeti starts a new interpreter for every script, and importing the pipeline costs about 0.1 s,
a quarter of writing a small image.  A worker that imported everything once forks a child per
run instead.  Nothing depends on it: without a worker, or with one running other code, the run
happens here exactly as before.

This module is on the path of every run, so until it knows it must run the script itself it
imports only builtins: ``_socket`` and ``_signal`` rather than their public wrappers, which
import ``enum`` and cost several milliseconds.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # no stub; the C half of signal
import _socket
import os
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds; mypy treats any TYPE_CHECKING as true
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import NoReturn

WORKER_SOCKET = "/run/instance-cloudimage/worker.sock"
HANDOVER_TIMEOUT = 30.0  # seconds for the worker to take a run; then the script runs itself
GO = b"go\n"
PROTOCOL = b"instance-cloudimage-worker/1"
MAX_REQUEST = 8 << 20  # Ganeti's environment (user-data included) stays far below this
FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
# fd 0-2 as Ganeti gave them (import reads the disk data from stdin, export writes it to stdout),
# and the working directory as a descriptor: a path could name another directory by the time
# the worker uses it, or none at all.  Then the descriptors the environment names (EXP_SIZE_FD,
# where export announces its size), which the child puts back at the same numbers.
FD_COUNT = 4
FD_VARIABLES = ("EXP_SIZE_FD",)
MAX_EXTRA_FDS = len(FD_VARIABLES)
# Named descriptors must be below this (Ganeti's is 11): the worker's child parks what it receives
# at and above it while it rearranges them, and a soft RLIMIT_NOFILE is often only 1024.
NAMED_FD_LIMIT = 100


def code_identity(package_dir: str | None = None) -> str:
    """What a worker must have loaded to run this script: the interpreter and the package's files.

    Sizes and modification times, not contents: this is read on every run.  A worker whose
    identity differs runs other code (an upgrade, another install) and must not take the run."""
    # realpath: the script and the worker may reach the package through different links.
    pkg = package_dir or os.path.dirname(os.path.realpath(__file__))
    parts = [sys.base_prefix, sys.version, pkg]  # not sys.prefix: -S leaves a venv's unset
    with os.scandir(pkg) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.endswith(".py"):
                st = entry.stat()
                parts.append(f"{entry.name} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(parts)


def named_fds(environ: Mapping[str, str]) -> list[int] | None:
    """The open descriptors FD_VARIABLES name; None if one is set but cannot be handed over
    (not a number, too high, not open): the script then runs here and reports it itself."""
    fds = []
    for name in FD_VARIABLES:
        if name not in environ:
            continue
        try:
            fd = int(environ[name])  # as env.py reads it
            os.fstat(fd)
        except (ValueError, OSError):
            return None
        if not 2 < fd < NAMED_FD_LIMIT:
            return None
        fds.append(fd)
    return fds


def encode_request(identity: str, verb: str, umask: int, argv: Sequence[str], environ: Mapping[str, str],
                   extra_fds: Sequence[int] = ()) -> bytes:
    """One length-prefixed message; NUL separates fields, which neither argv nor the environment can hold."""
    fields = [PROTOCOL, identity.encode(), verb.encode(), b"%o" % umask, ",".join(map(str, extra_fds)).encode(),
              b"%d" % len(argv)]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]
    payload = b"\0".join(fields)
    return len(payload).to_bytes(4, "big") + payload


def connect(path: str) -> _socket.socket | None:
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    if sock.fileno() <= 2:  # fd 0-2 were closed: the socket would be handed over as one of them
        sock.close()
        return None
    sock.settimeout(HANDOVER_TIMEOUT)  # a wedged worker must not hang Ganeti's job
    try:
        sock.connect(path)
    except OSError:  # no worker (ENOENT, ECONNREFUSED), not ours to use (EACCES), or no answer
        sock.close()
        return None
    return sock


def send_request(sock: _socket.socket, request: bytes, extra_fds: Sequence[int]) -> bool:
    try:
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    if cwd <= 2:
        os.close(cwd)
        return False
    try:
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, cwd, *extra_fds))
        sent = sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        sock.sendall(request[sent:])
        return True
    except OSError:  # a closed stdin/stdout (EBADF), or the worker went away
        return False
    finally:
        os.close(cwd)


class Replies:
    """The worker's lines: ``pid N`` when a child took the run, then ``exit N``; or ``stale``."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next_line(self) -> bytes | None:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(256)
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def delegate(verb: str, worker: str, argv: Sequence[str], environ: Mapping[str, str]) -> int | None:
    """Run the script in the worker and return its exit code; None when this process must run it."""
    sock = connect(worker)
    if sock is None:
        return None
    umask = os.umask(0o022)
    os.umask(umask)
    extra = named_fds(environ)
    if extra is None or not send_request(sock, encode_request(code_identity(), verb, umask, argv, environ, extra),
                                         extra):
        sock.close()
        return None
    replies = Replies(sock)
    first = replies.next_line()
    if first is None or not first.startswith(b"pid "):
        sock.close()  # "stale": the worker runs other code; no answer in time: it must not start now
        return None
    child = int(first[4:])

    def forward(signum: int, frame: object) -> None:
        # Ganeti stops a script with SIGTERM; the child's own handler unwinds its mounts and loops.
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    try:
        sock.sendall(GO)  # the child starts only now: until here this process could still run the script
    except OSError:
        sock.close()
        return None
    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, forward)
    sock.settimeout(None)  # the run itself takes as long as it takes
    while (line := replies.next_line()) is not None:
        if line.startswith(b"exit "):
            return int(line[5:])
    os.write(2, f"{os.path.basename(argv[0]) if argv else verb}: error: the instance-cloudimage worker ended "
                f"this {verb} without an exit status; see the worker's log "
                "(journalctl -u instance-cloudimage-worker)\n".encode())
    return 1


def run_script(verb: str, worker: str = WORKER_SOCKET) -> NoReturn:
    """What scripts/<verb> calls."""
    code = delegate(verb, worker, sys.argv, os.environ)
    if code is not None:
        os._exit(code)
    if sys.flags.no_site:  # installed scripts start with -S for speed; running here needs site-packages
        import site

        site.main()
    from .cli import exit_now, os_script_main

    exit_now(os_script_main(verb))
