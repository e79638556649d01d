"""The one wrapper around subprocesses.

argv lists only (never a shell), stdin closed unless given, a fixed ``LANG``/``PATH`` so that
tool output is parseable whatever environment Ganeti gave us, the command logged at debug, and a
``CommandError`` carrying stderr on failure.
"""

from __future__ import annotations

import codecs
import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from instance_cloudimage.runtime.errors import CommandError, CommandNotFound

log = logging.getLogger(__name__)

# Ganeti runs us with PATH=/sbin:/bin:/usr/sbin:/usr/bin; local tests may not have /sbin.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Debian package for each tool, so "not found" can say what to install.
PACKAGES = {
    "qemu-img": "qemu-utils",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "sfdisk": "fdisk",
    "blkid": "util-linux",
    "wipefs": "util-linux",
    "mke2fs": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "xfs_growfs": "xfsprogs",
    "btrfs": "btrfs-progs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mdel": "mtools",
    "xz": "xz-utils",
    "pigz": "pigz",
    "lbzip2": "lbzip2",
    "gpgv": "gpgv",
    "sgdisk": "gdisk",
    "prlimit": "util-linux",
}


@dataclass(frozen=True)
class Limits:
    """Resource limits for a child (CVE-2015-5162 class defences).

    Applied by exec'ing the child through util-linux ``prlimit``, not in a ``preexec_fn``: Python
    code between fork and exec is unsafe while other threads run (a download's producer, a
    decoder's feeder), and without it subprocess can use vfork."""

    address_space: int | None = None
    cpu_seconds: int | None = None

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` (its tool already resolved) run under these limits."""
        options = []
        if self.address_space is not None:
            options.append(f"--as={self.address_space}")
        if self.cpu_seconds is not None:
            options.append(f"--cpu={self.cpu_seconds}")
        return [find_tool("prlimit"), *options, "--", *argv] if options else argv


def find_tool(name: str) -> str:
    """Return the absolute path of a host tool, or raise CommandNotFound."""
    path = shutil.which(name, path=SAFE_PATH)
    if path is None:
        raise CommandNotFound(name, PACKAGES.get(name))
    return path


def resolve_argv(argv: Sequence[str], background: bool = False) -> list[str]:
    """``argv`` as strings with its tool found on the safe PATH (unless given as a path),
    logged at debug as it will run (``&`` for a child that is not waited for)."""
    out = [os.fspath(a) for a in argv]
    if not os.path.isabs(out[0]):
        out[0] = find_tool(out[0])
    log.debug("+ %s%s", shlex.join(out), " &" if background else "")
    return out


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every child gets: minimal and predictable, plus ``extra``."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    replace_env: bool = False,
    timeout: float | None = None,
    limits: Limits | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` and wait for it.

    stderr is always captured (it goes into ``CommandError``); stdout is captured unless a
    file is given.  ``env`` is added to the minimal child environment, or replaces it with
    ``replace_env``.  Raises CommandNotFound or CommandError.
    """
    argv = resolve_argv(argv)
    child_env = dict(env or {}) if replace_env else child_environment(env)
    if input is not None and stdin is not None:
        raise ValueError("give input or stdin, not both")
    try:
        proc = subprocess.run(  # noqa: S603 - argv list, no shell
            limits.wrap(argv) if limits else argv,
            input=input,
            stdin=subprocess.DEVNULL if (input is None and stdin is None) else stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_env,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandNotFound(argv[0], PACKAGES.get(os.path.basename(argv[0]))) from e
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        raise CommandError(argv, -9, f"timed out after {timeout:.0f}s\n{err}") from e
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace")
        log.debug("%s exited %d: %s", argv[0], proc.returncode, stderr.strip())
        raise CommandError(argv, proc.returncode, stderr)
    return proc


def run_text(argv: Sequence[str], **kwargs: Any) -> str:
    """Run ``argv`` and return its stdout decoded as UTF-8."""
    return run(argv, **kwargs).stdout.decode(errors="replace")


@dataclass(frozen=True)
class StreamedRun:
    returncode: int  # negative: killed by that signal
    timed_out: bool


# How long to keep reading after the child exited: a background grandchild may hold the pipe.
DRAIN_AFTER_EXIT = 2.0
KILL_GRACE = 3.0
MAX_LINE = 4096


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it if it has not gone after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_streaming(
    argv: Sequence[str],
    on_line: Callable[[str], None],
    *,
    env: Mapping[str, str],
    timeout: float | None = None,
    cwd: str = "/",
    limits: Limits | None = None,
    split_cr: bool = False,
) -> StreamedRun:
    """Run ``argv`` with exactly ``env``, handing each line of its merged stdout/stderr to ``on_line``.

    For output that matters while the child runs: administrators' programs (hooks), whose lines
    belong in Ganeti's log as they come, and qemu-img's progress, which ends its updates with a
    carriage return (``split_cr``: a line ends at ``\r`` too, and empty lines are dropped).
    The child runs in its own session; on timeout, error or SIGTERM its whole process group is
    killed, so a shell hook's children do not outlive it.  Raises CommandNotFound.
    """
    argv = resolve_argv(argv)
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            limits.wrap(argv) if limits else argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True,
        )
    except FileNotFoundError as e:
        raise CommandNotFound(argv[0], PACKAGES.get(os.path.basename(argv[0]))) from e
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    deadline = None if timeout is None else time.monotonic() + timeout
    exited_at: float | None = None
    timed_out = False

    def emit_lines(text: str) -> str:
        """Hand over every complete line of ``text``; return the unfinished rest."""
        *lines, rest = (text.replace("\r", "\n") if split_cr else text).split("\n")
        for line in lines:
            if split_cr and not line:
                continue
            on_line(line.rstrip("\r")[:MAX_LINE])
        if len(rest) > MAX_LINE:  # a runaway line without a newline
            on_line(rest[:MAX_LINE])
            rest = ""
        return rest

    eof = False
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > DRAIN_AFTER_EXIT:
                    break
                if deadline is not None and exited_at is None and now >= deadline:
                    timed_out = True
                    break
                if sel.select(0.2):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        eof = True
                        break
                    pending = emit_lines(pending + decoder.decode(chunk))
        pending += decoder.decode(b"", final=True)
        if pending:
            on_line(pending.rstrip("\r")[:MAX_LINE])
        if eof and exited_at is None:  # it closed its output but is still working
            try:
                proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc.poll() is None or timed_out:
            _kill_group(proc)
        elif not eof:
            # The child exited but something it started still holds the pipe: end it too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdout.close()
    returncode = proc.wait()
    return StreamedRun(returncode=returncode, timed_out=timed_out)
class Spawned:
    """A child running alongside us (a decompressor in a pipeline); see ``spawn``."""

    def __init__(self, argv: list[str], proc: subprocess.Popen[bytes], stderr: IO[bytes]) -> None:
        self.argv = argv
        self.proc = proc
        self._stderr = stderr

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read(65536).decode(errors="replace")

    def wait_checked(self, timeout: float | None = None) -> None:
        """Wait for the child; raise CommandError if it failed."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CommandError(self.argv, -9, f"timed out after {timeout:.0f}s") from None
        if rc != 0:
            stderr = self.stderr_text()
            log.debug("%s exited %d: %s", self.argv[0], rc, stderr.strip())
            raise CommandError(self.argv, rc, stderr)

    def kill(self) -> None:
        """Stop the child (if still running) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._stderr.close()


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    env: Mapping[str, str] | None = None,
    limits: Limits | None = None,
) -> Spawned:
    """Start ``argv`` without waiting, with the same environment and logging policy as ``run``.

    For streaming pipelines only (a decompressor fed through a pipe).  stderr goes to an
    anonymous temporary file, so a chatty child can never block on it.  The caller must
    ``close()`` the result (register it on the ExitStack).
    """
    argv = resolve_argv(argv, background=True)
    stderr = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            limits.wrap(argv) if limits else argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=stdout,
            stderr=stderr,
            env=child_environment(env),
        )
    except FileNotFoundError as e:
        stderr.close()
        raise CommandNotFound(argv[0], PACKAGES.get(os.path.basename(argv[0]))) from e
    return Spawned(argv, proc, stderr)
