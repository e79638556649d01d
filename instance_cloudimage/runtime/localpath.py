"""Local image paths are a security boundary (docs/images.md, "Checks, in order").

A path must resolve (symlinks and ``..`` followed) to a regular file inside one of the site's
allowed directories, and never under /dev, /proc, /sys, /etc, /boot or /run.

Security: whoever can write below an allowed directory can swap one of its subdirectories for a
symlink between the check and the open (renameat2 RENAME_EXCHANGE in a loop).  So the file is
opened from a descriptor of the allowed directory, walking the resolved path beneath it without
following any symlink (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, or a component-by-component
O_NOFOLLOW walk where openat2 is missing): what is opened lies inside the allowed tree by
construction, and a swapped path fails with one line instead.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.runtime.siteconfig import SiteConfig

FORBIDDEN_ROOTS = ("/dev", "/proc", "/sys", "/etc", "/boot", "/run")
SYS_OPENAT2 = 437  # the same number on every architecture (the generic syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def below(path: str, root: str) -> bool:
    """Whether the resolved ``path`` lies inside the resolved directory ``root`` (not ``root`` itself)."""
    return path != root and _inside(path, root)


def resolve_local_image_path(raw: str, site: SiteConfig, *, what: str = "image") -> Path:
    """Return the resolved path, or raise ParameterError saying why it is refused."""
    return resolve_local_image(raw, site, what=what)[0]


def resolve_local_image(raw: str, site: SiteConfig, *, what: str = "image") -> tuple[Path, Path]:
    """The resolved path and the allowed directory (``allowed_root``) that holds it, or
    ParameterError saying why it is refused."""
    if not os.path.isabs(raw):
        raise ParameterError(f"{what} path must be absolute")
    if "\x00" in raw:
        raise ParameterError(f"{what} path contains a NUL byte")
    if any(part == ".." for part in raw.split("/")):
        raise ParameterError(f"{what} path must not contain '..'")
    try:
        real = os.path.realpath(raw)
        root = allowed_root(Path(real), site, what=what)
        st = os.stat(real)
    except OSError as e:
        raise ParameterError(f"{what} path cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ParameterError(f"{what} path is not a regular file")
    return Path(real), root


def allowed_root(real: Path, site: SiteConfig, *, what: str = "image") -> Path:
    """The allowed directory (resolved) that holds the resolved path ``real``; ParameterError if none."""
    for root in FORBIDDEN_ROOTS:
        if _inside(os.fspath(real), root):
            raise ParameterError(f"{what} path points into {root}, which is never read")
    for d in site.allowed_dirs:
        resolved = os.path.realpath(d)
        if below(os.fspath(real), resolved):
            return Path(resolved)
    raise ParameterError(
        f"{what} path is outside the allowed image directories",
        f"allowed: {', '.join(site.allowed_dirs)} ([Images] AllowedDirectories in "
        f"{site.paths.site_config}); symlinks are resolved first",
    )


def check_local_image_path(raw: str, site: SiteConfig, *, what: str = "image") -> None:
    resolve_local_image_path(raw, site, what=what)


def open_local_image(path: Path, root: Path) -> int:
    """Open the resolved ``path`` read-only from a descriptor of ``root``, never leaving it and
    never following a symlink on the way (see the module's docstring); return the fd.
    Raises ParameterError, one line, for anything that changed since the check."""
    rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith("../") or rel == "..":
        raise ParameterError("image file is outside its allowed directory")
    # O_NONBLOCK: a FIFO swapped in after the check would otherwise block the open forever.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        top = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = _open_beneath(top, rel, flags)
        finally:
            os.close(top)
    except OSError as e:
        raise ParameterError(f"image file cannot be opened: {e.strerror}",
                             "its path must not change while it is used (no symlink or moved "
                             "directory below the allowed image directory)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ParameterError("image file is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _open_beneath(top: int, rel: str, flags: int) -> int:
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(SYS_OPENAT2, top, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter that does not know openat2
        raise OSError(err, os.strerror(err))
    return _walk_beneath(top, rel, flags)


def _walk_beneath(top: int, rel: str, flags: int) -> int:
    """openat2's guarantee by hand: each directory opened with O_NOFOLLOW from the one before."""
    *dirs, name = rel.split("/")
    current = top
    try:
        for part in dirs:
            if part in ("", ".", ".."):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            if current != top:
                os.close(current)
            current = nxt
        return os.open(name, flags, dir_fd=current)
    finally:
        if current != top:
            os.close(current)


def pinned_path(fd: int) -> str:
    """A path naming exactly what ``fd`` has open, for another program (qemu-img, mount, a hook):
    the kernel resolves it to that inode, never by re-walking the original path."""
    return f"{pinned_prefix()}{fd}"


def pinned_prefix() -> str:
    return f"/proc/{os.getpid()}/fd/"


def open_verified_file(path: Path) -> int:
    """Open a file this process verified, read-only: without following a symlink swapped in at
    its path, except our own pinned descriptor paths (``pinned_path``), which are links by nature."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    if not os.fspath(path).startswith(pinned_prefix()):
        flags |= os.O_NOFOLLOW
    return os.open(path, flags)


def only_root_can_change(st: os.stat_result) -> bool:
    """Whether nobody but root (or the user running us) can write this inode.

    Named ACL entries that grant write also set the group write bit (the ACL mask), so the mode
    bits tell the whole story."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
