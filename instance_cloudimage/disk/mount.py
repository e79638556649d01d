"""Attaching and mounting the guest's filesystems on the host, undone on every path out.

A partition is reached with ``losetup --find --show --offset --sizelimit`` (no ``-P``: there is no
udev to create partition nodes, and no device-mapper for kpartx), its filesystem type checked
(ext2/3/4, xfs, btrfs), and mounted ``nosuid,nodev,noexec`` (xfs also ``nouuid``, because a clone
of the same image may be mounted at the same time).  Every loop device, mount and directory is
registered on the caller's ExitStack the moment it exists, with SIGTERM/SIGINT held back between
"created" and "registered", so success, an error and ``cli.Terminated`` all unwind it.

Security: the guest filesystem is untrusted.  A separate /var is mounted through a file
descriptor of the directory found by walking without following symlinks, never through a path
string the image could redirect to the host.  Writing into the guest goes through disk/guestfiles.py.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from instance_cloudimage.disk.guestfiles import open_guest_dir
from instance_cloudimage.disk.partitions import (
    LINUX_FILESYSTEMS,
    GuestLayout,
    Partition,
    PartitionTable,
    find_guest_layout,
)
from instance_cloudimage.runtime.errors import CommandError, SeedError
from instance_cloudimage.runtime.localpath import pinned_path
from instance_cloudimage.runtime.process import run, run_text

log = logging.getLogger(__name__)

MOUNT_OPTIONS = ("nosuid", "nodev", "noexec")
DEFERRED_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the block ends, so a resource and its cleanup are registered together.

    A signal that arrived meanwhile is delivered (``cli.Terminated`` raised) when the block ends,
    after the cleanup is on the stack.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _detach_loop(device: str) -> None:
    with signals_deferred():
        try:
            run(["losetup", "--detach", device])
        except CommandError as e:
            log.warning("could not detach %s: %s", device, e)


def attach_loop(path: str, stack: ExitStack, *, offset: int = 0, size: int | None = None,
                read_only: bool = False) -> str:
    """Attach ``path`` (a byte range of it) to a free loop device, detached when ``stack`` unwinds."""
    argv = ["losetup", "--find", "--show", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    with signals_deferred():
        try:
            device = run_text([*argv, path]).strip()
        except CommandError as e:
            raise SeedError(f"cannot attach {path} to a loop device: {e}") from None
        stack.callback(_detach_loop, device)
    log.debug("attached %s (offset %d) to %s", path, offset, device)
    return device


def _unmount(target: str) -> None:
    with signals_deferred():
        try:
            run(["umount", target])
        except CommandError as e:
            # A hook may have left a process inside; a lazy unmount still takes it out of the
            # namespace, and the loop device (autoclear) goes away with the last user.
            log.warning("unmounting %s failed (%s); detaching it lazily", target, e)
            try:
                run(["umount", "--lazy", target])
            except CommandError as e2:
                log.warning("lazy unmount of %s failed: %s", target, e2)


def _remove_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e.strerror)


def make_mount_dir(stack: ExitStack, prefix: str = "cloudimage-guest-") -> Path:
    """A private empty directory, removed when ``stack`` unwinds (after what is mounted on it)."""
    with signals_deferred():
        path = tempfile.mkdtemp(prefix=prefix)
        stack.callback(_remove_dir, path)
    return Path(path)


def detect_fstype(device: str) -> str:
    """The filesystem on ``device``; SeedError unless it is one we mount."""
    proc = run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False)
    fstype = proc.stdout.decode(errors="replace").strip() if proc.returncode == 0 else ""
    if fstype not in LINUX_FILESYSTEMS:
        raise SeedError(f"the guest filesystem is {fstype or 'not recognised'}; only "
                        f"{', '.join(LINUX_FILESYSTEMS)} can be mounted")
    return fstype


def mount_options(fstype: str, read_only: bool = False) -> str:
    opts = list(MOUNT_OPTIONS)
    if fstype == "xfs":
        opts.append("nouuid")
    if read_only:
        opts.append("ro")
    return ",".join(opts)


def mount_device(device: str, target: str, stack: ExitStack, *, read_only: bool = False,
                 unmount_as: str | None = None) -> str:
    """Mount ``device`` on ``target`` (unmounted when ``stack`` unwinds); return its filesystem type.

    ``target`` is passed to mount(8) without canonicalisation, so it may be a /proc/<pid>/fd/N
    link to a directory that was opened safely; ``unmount_as`` then names the mount point for
    umount, after that descriptor is closed.
    """
    fstype = detect_fstype(device)
    argv = ["mount", "--no-canonicalize", "-t", fstype, "-o", mount_options(fstype, read_only), device, target]
    with signals_deferred():
        try:
            run(argv)
        except CommandError as e:
            raise SeedError(f"cannot mount the guest's {fstype} filesystem: {e}") from None
        stack.callback(_unmount, unmount_as or target)
    return fstype


def mount_partition(disk_path: str, part: Partition, stack: ExitStack, *, read_only: bool = False) -> tuple[str, Path]:
    """Attach and mount one partition on a fresh directory; return (loop device, mount point)."""
    device = attach_loop(disk_path, stack, offset=part.start, size=part.size, read_only=read_only)
    where = make_mount_dir(stack)
    mount_device(device, os.fspath(where), stack, read_only=read_only)
    return device, where


@dataclass(frozen=True)
class MountedRoot:
    """The guest's root filesystem mounted at ``path`` (its /var too, when separate)."""

    path: Path
    root: Partition
    var: Partition | None
    table: PartitionTable
    root_device: str  # the loop device of the root partition

    @property
    def partition_number(self) -> int | None:
        return self.root.number

    @property
    def device(self) -> str:
        """The block device holding the root filesystem (a loop device), for ROOT_PARTITION."""
        return self.root_device


def mount_var(disk_path: str, layout: GuestLayout, root: Path, stack: ExitStack, *, read_only: bool = False) -> None:
    """Mount the separate /var partition on the guest's own /var directory, reached without symlinks.

    Read-only, a missing /var directory (which read-write would create) is a SeedError.
    """
    if layout.var is None:
        return
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        var_fd = open_guest_dir(root_fd, "var", create=not read_only, mode=0o755)
    finally:
        os.close(root_fd)
    try:
        device = attach_loop(disk_path, stack, offset=layout.var.start, size=layout.var.size, read_only=read_only)
        # Security: the kernel resolves /proc/<pid>/fd/N to exactly the directory we opened; the
        # path string of /var is never re-resolved.  umount later uses root/var, which cannot
        # change while something is mounted on it.
        mount_device(device, pinned_path(var_fd), stack, read_only=read_only,
                     unmount_as=os.fspath(root / "var"))
    finally:
        os.close(var_fd)


def mount_guest_root(disk_path: str, stack: ExitStack, *, arch: str, layout: GuestLayout | None = None,
                     read_only: bool = False) -> MountedRoot:
    """Find and mount the guest's root filesystem (and a separate /var), read-write unless ``read_only``.

    Read-only goes through read-only loop devices, so not a byte of the disk changes; a
    filesystem whose journal needs replaying then fails to mount (SeedError).  Everything is
    registered on ``stack``.  Raises SeedError when the disk has no usable Linux filesystem,
    UnsafeImage when the image's /var is a symbolic link.
    """
    layout = layout or find_guest_layout(disk_path, arch)
    device, where = mount_partition(disk_path, layout.root, stack, read_only=read_only)
    if layout.var is not None:
        mount_var(disk_path, layout, where, stack, read_only=read_only)
    log.debug("guest root %s mounted at %s", layout.root.describe(), where)
    return MountedRoot(path=where, root=layout.root, var=layout.var, table=layout.table, root_device=device)
