"""Local image paths are a security boundary (docs/images.md, "Checks, in order").

A path must resolve (symlinks and ``..`` followed) to a regular file inside one of the site's
allowed directories, and never under /dev, /proc, /sys, /etc, /boot or /run.  Opening uses
O_NOFOLLOW on the resolved path and re-checks with fstat, so a swap after the check is caught.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.runtime.siteconfig import SiteConfig

FORBIDDEN_ROOTS = ("/dev", "/proc", "/sys", "/etc", "/boot", "/run")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_local_image_path(raw: str, site: SiteConfig, *, what: str = "image") -> Path:
    """Return the resolved path, or raise ParameterError saying why it is refused."""
    if not os.path.isabs(raw):
        raise ParameterError(f"{what} path must be absolute")
    if "\x00" in raw:
        raise ParameterError(f"{what} path contains a NUL byte")
    if any(part == ".." for part in raw.split("/")):
        raise ParameterError(f"{what} path must not contain '..'")
    real = os.path.realpath(raw)
    for root in FORBIDDEN_ROOTS:
        if _inside(real, root):
            raise ParameterError(f"{what} path points into {root}, which is never read")
    allowed = [os.path.realpath(d) for d in site.allowed_dirs]
    if not any(_inside(real, d) and real != d for d in allowed):
        raise ParameterError(
            f"{what} path is outside the allowed image directories",
            f"allowed: {', '.join(site.allowed_dirs)} ([Images] AllowedDirectories in "
            f"{site.paths.site_config}); symlinks are resolved first",
        )
    try:
        st = os.stat(real)
    except OSError as e:
        raise ParameterError(f"{what} path cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ParameterError(f"{what} path is not a regular file")
    return Path(real)


def check_local_image_path(raw: str, site: SiteConfig, *, what: str = "image") -> None:
    resolve_local_image_path(raw, site, what=what)


def open_local_image(path: Path) -> int:
    """Open a resolved path read-only without following a (swapped-in) symlink; return the fd."""
    try:
        # O_NONBLOCK: a FIFO swapped in after the check would otherwise block the open forever.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ParameterError(f"image file cannot be opened: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ParameterError("image file is not a regular file")
    os.set_blocking(fd, True)
    return fd


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
