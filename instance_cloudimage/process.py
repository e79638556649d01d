"""The one wrapper around subprocesses.

argv lists only (never a shell), stdin closed unless given, a fixed ``LANG``/``PATH`` so that
tool output is parseable whatever environment Ganeti gave us, the command logged at debug, and a
``CommandError`` carrying stderr on failure.
"""

from __future__ import annotations

import logging
import os
import resource
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .errors import CommandError, CommandNotFound

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
    "partx": "util-linux",
    "mke2fs": "e2fsprogs",
    "mkfs.ext4": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "xfs_growfs": "xfsprogs",
    "btrfs": "btrfs-progs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "xorriso": "xorriso",
    "xz": "xz-utils",
    "pigz": "pigz",
    "lbzip2": "lbzip2",
    "zstd": "zstd",
    "gpgv": "gpgv",
    "sgdisk": "gdisk",
    "prlimit": "util-linux",
}


@dataclass(frozen=True)
class Limits:
    """Resource limits applied in the child before exec (CVE-2015-5162 class defences)."""

    address_space: int | None = None
    cpu_seconds: int | None = None

    def apply(self) -> None:
        if self.address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.address_space, self.address_space))
        if self.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds))


def find_tool(name: str) -> str:
    """Return the absolute path of a host tool, or raise CommandNotFound."""
    path = shutil.which(name, path=SAFE_PATH)
    if path is None:
        raise CommandNotFound(name, PACKAGES.get(name))
    return path


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
    argv = [os.fspath(a) for a in argv]
    if not os.path.isabs(argv[0]):
        argv[0] = find_tool(argv[0])
    log.debug("+ %s", shlex.join(argv))
    child_env = dict(env or {}) if replace_env else child_environment(env)
    preexec: Callable[[], None] | None = limits.apply if limits else None
    if input is not None and stdin is not None:
        raise ValueError("give input or stdin, not both")
    try:
        proc = subprocess.run(  # noqa: S603 - argv list, no shell
            argv,
            input=input,
            stdin=subprocess.DEVNULL if (input is None and stdin is None) else stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_env,
            timeout=timeout,
            preexec_fn=preexec,
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
    import tempfile

    argv = [os.fspath(a) for a in argv]
    if not os.path.isabs(argv[0]):
        argv[0] = find_tool(argv[0])
    log.debug("+ %s &", shlex.join(argv))
    stderr = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            argv,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=stdout,
            stderr=stderr,
            env=child_environment(env),
            preexec_fn=limits.apply if limits else None,
        )
    except FileNotFoundError as e:
        stderr.close()
        raise CommandNotFound(argv[0], PACKAGES.get(os.path.basename(argv[0]))) from e
    return Spawned(argv, proc, stderr)
