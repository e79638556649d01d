"""Reading and writing files inside a mounted, untrusted guest filesystem.

Security: an image may plant symbolic links (``/var/lib/cloud -> /etc``), hard links, FIFOs or
device nodes where we write.  A path string under the mount point would be resolved by the host
kernel against the *host's* root for absolute links, so nothing here ever opens a guest path by
string.  Paths are walked one component at a time with ``openat(O_NOFOLLOW | O_DIRECTORY)``
relative to a directory descriptor; a symbolic link anywhere on the way is refused.  Files are
created with ``O_EXCL | O_NOFOLLOW`` under a temporary name, owned by root and mode 0600 unless
told otherwise, then renamed over the old entry (rename replaces a planted link itself, never
what it points to).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from instance_cloudimage.runtime.errors import SeedError, UnsafeImage

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_guest_path(path: str) -> list[str]:
    """``/var/lib/cloud`` → ``["var", "lib", "cloud"]``; refuses ``..`` and empty names."""
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"guest path {path!r} must not contain '..'")
    return parts


def _refuse_link(where: str) -> UnsafeImage:
    return UnsafeImage(f"the image's /{where} is a symbolic link or not a directory; refusing to follow it")


def open_guest_dir(base_fd: int, path: str, *, create: bool = False, mode: int = 0o700, uid: int = 0,
                   gid: int = 0, shown_below: str = "") -> int:
    """Open directory ``path`` below ``base_fd`` without following any symlink; return its fd.

    With ``create``, missing directories are made with ``mode``, owned by ``uid``:``gid`` (root).  Raises
    UnsafeImage on a symlink or non-directory on the way, SeedError when a directory is missing.
    ``shown_below`` is the guest path of ``base_fd``, for messages.
    """
    fd = os.dup(base_fd)
    walked: list[str] = split_guest_path(shown_below)
    try:
        for name in split_guest_path(path):
            walked.append(name)
            nfd = _open_subdir(fd, name, "/".join(walked), create, mode, uid, gid)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_subdir(fd: int, name: str, where: str, create: bool, mode: int, uid: int, gid: int) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise SeedError(f"/{where} does not exist in the guest") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse_link(where) from None
        raise SeedError(f"cannot open /{where} in the guest: {e.strerror}") from None
    try:
        try:
            os.mkdir(name, mode, dir_fd=fd)
        except FileExistsError:
            pass  # raced with nothing we know of; the open below decides
        nfd = os.open(name, DIR_FLAGS, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse_link(where) from None
        raise SeedError(f"cannot create /{where} in the guest: {e.strerror}") from None
    try:
        os.fchown(nfd, uid, gid)
        os.fchmod(nfd, mode)
    except OSError as e:
        os.close(nfd)
        raise SeedError(f"cannot create /{where} in the guest: {e.strerror}") from None
    return nfd


@contextmanager
def guest_dir(base: str | os.PathLike[str] | int, path: str, *, create: bool = False,
              mode: int = 0o700, uid: int = 0, gid: int = 0, shown_below: str = "") -> Iterator[int]:
    """``open_guest_dir`` as a context manager; ``base`` is a mount point or a directory fd."""
    if isinstance(base, int):
        fd = open_guest_dir(base, path, create=create, mode=mode, uid=uid, gid=gid, shown_below=shown_below)
    else:
        root = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_guest_dir(root, path, create=create, mode=mode, uid=uid, gid=gid)
        finally:
            os.close(root)
    try:
        yield fd
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad file name {name!r}")


def remove_guest_file(dir_fd: int, name: str) -> bool:
    """Remove the entry ``name`` (any kind but a directory) without following it; True if it existed."""
    _check_name(name)
    try:
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        raise UnsafeImage(f"the image has a directory where the file {name} is written") from None
    except OSError as e:  # an immutable entry, a read-only filesystem
        raise SeedError(f"cannot remove {name} in the guest: {e.strerror}") from None


def write_guest_file(dir_fd: int, name: str, data: bytes, *, mode: int = 0o600, uid: int = 0,
                     gid: int = 0) -> None:
    """Atomically replace ``name`` in ``dir_fd`` with a new regular file holding ``data``.

    The new file is created under a temporary name with ``O_EXCL | O_NOFOLLOW`` and renamed over
    the old entry, so a planted symlink, hard link or FIFO is replaced, never opened.
    """
    _check_name(name)
    tmp = f".{name}.cloudimage-new"
    remove_guest_file(dir_fd, tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as e:
        raise SeedError(f"cannot write {name} into the guest: {e.strerror}") from None
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        remove_guest_file(dir_fd, tmp)
        if isinstance(e, OSError):  # a full or read-only guest filesystem, not a bug
            raise SeedError(f"cannot write {name} into the guest: {e.strerror}") from None
        raise
    os.close(fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        raise _not_placed(dir_fd, tmp, e, f"the image has a directory where the file {name} is written",
                          f"cannot write {name} into the guest: {e.strerror}") from None


def _not_placed(dir_fd: int, tmp: str, e: OSError, directory: str, failed: str) -> UnsafeImage | SeedError:
    """Remove ``tmp``, which did not take its name, and return what to raise for ``e``: UnsafeImage
    saying ``directory`` when a directory holds the name, else SeedError saying ``failed``."""
    remove_guest_file(dir_fd, tmp)
    if e.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
        return UnsafeImage(directory)
    return SeedError(failed)


def read_guest_file(dir_fd: int, name: str, *, limit: int = 1 << 20, shown: str | None = None) -> bytes | None:
    """The content of regular file ``name``, or None when it does not exist.

    Refuses symlinks and anything that is not a regular file (a FIFO would block; a device node
    on the nodev mount and a socket cannot even be opened), and files larger than ``limit``.
    ``shown`` is how messages name the file (default: ``name``).
    """
    _check_name(name)
    shown = shown or name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeImage(f"the image's {shown} is a symbolic link; refusing to follow it") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV, errno.EISDIR):
            raise UnsafeImage(f"the image's {shown} is not a regular file") from None
        raise SeedError(f"the guest's {shown} cannot be read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeImage(f"the image's {shown} is not a regular file")
        if st.st_size > limit:
            raise SeedError(f"the guest's {shown} is larger than {limit} bytes")
        chunks = []
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        except OSError as e:  # a damaged guest filesystem
            raise SeedError(f"the guest's {shown} cannot be read: {e.strerror}") from None
        return b"".join(chunks)
    finally:
        os.close(fd)


def stat_guest_entry(dir_fd: int, name: str) -> os.stat_result | None:
    """lstat of ``name`` in ``dir_fd`` (never following it), or None."""
    _check_name(name)
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def write_guest_symlink(dir_fd: int, name: str, target: str, *, uid: int = 0, gid: int = 0) -> None:
    """Atomically make ``name`` in ``dir_fd`` a symbolic link to ``target`` (never followed here:
    it only means something inside the guest)."""
    _check_name(name)
    tmp = f".{name}.cloudimage-new"
    remove_guest_file(dir_fd, tmp)
    try:
        os.symlink(target, tmp, dir_fd=dir_fd)
        os.chown(tmp, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        raise _not_placed(dir_fd, tmp, e, f"the image has a directory where the link {name} is made",
                          f"cannot make the link {name} in the guest: {e.strerror}") from None


MAX_TREE_ENTRIES = 1000
MAX_TREE_DEPTH = 8


def copy_guest_tree(src_fd: int, dst_fd: int, *, uid: int, gid: int, shown: str, budget: list[int] | None = None,
                    depth: int = 0) -> None:
    """Copy the directory ``src_fd`` into ``dst_fd`` inside one guest, as ``useradd -m`` copies
    /etc/skel: directories, regular files and symbolic links (as links), owned by ``uid``:``gid``
    with their modes; anything else is skipped.  ``shown`` names ``src_fd`` for messages.  At most
    MAX_TREE_ENTRIES entries and MAX_TREE_DEPTH levels: the tree is the image's."""
    budget = [MAX_TREE_ENTRIES] if budget is None else budget
    if depth > MAX_TREE_DEPTH:
        raise UnsafeImage(f"the image's {shown} is nested more than {MAX_TREE_DEPTH} levels deep")
    for name in sorted(os.listdir(src_fd)):
        budget[0] -= 1
        if budget[0] < 0:
            raise UnsafeImage(f"the image's {shown} holds more than {MAX_TREE_ENTRIES} entries")
        st = stat_guest_entry(src_fd, name)
        if st is None:
            continue
        where = f"{shown}/{name}"
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            with guest_dir(src_fd, name, shown_below=shown) as sub, \
                    guest_dir(dst_fd, name, create=True, mode=mode, uid=uid, gid=gid) as out:
                copy_guest_tree(sub, out, uid=uid, gid=gid, shown=where, budget=budget, depth=depth + 1)
        elif stat.S_ISREG(st.st_mode):
            data = read_guest_file(src_fd, name, shown=where) or b""
            write_guest_file(dst_fd, name, data, mode=mode, uid=uid, gid=gid)
        elif stat.S_ISLNK(st.st_mode):
            write_guest_symlink(dst_fd, name, os.readlink(name, dir_fd=src_fd), uid=uid, gid=gid)
