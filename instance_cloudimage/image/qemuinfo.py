"""qemu-img info, the second opinion on a random-access image, asked once per image file.

Every create from the same cached (or root-owned local) image asks qemu-img the same question
about the same bytes, and a qemu-img start costs ~10 ms, a few percent of a small image's write.
So the answer (qemu-img's JSON, before any check) is kept in ``<cache-dir>/qemu-info/``, keyed by
the file's identity: device, inode, size, modification and change times (a change time no
process can set; any write or chmod moves it), the detected format, and the qemu-img binary.
convert.inspect_with_qemu applies every check to the JSON each time, cached or not, so a
change of our rules takes effect at once.  A record is used only if root (or this user) owns it and no
one else can write it; anything odd about it and qemu-img is simply asked again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from instance_cloudimage.image.formats import DetectedImage
from instance_cloudimage.runtime.localpath import only_root_can_change
from instance_cloudimage.runtime.process import find_tool

log = logging.getLogger(__name__)

RECORD_DIR = "qemu-info"
PLAIN_PATH = re.compile(r"[A-Za-z0-9/._+-]+")
PLACEHOLDER = "@image-path@"  # "@" is not in a plain path
MAX_RECORD = 1 << 20


def identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def record_key(st: os.stat_result, detected: DetectedImage) -> str:
    """The record's file name: the identities themselves, readable and not hashed."""
    qemu = os.stat(find_tool("qemu-img"))
    fields = ("v3", *identity(st), detected.format.value, *identity(qemu))  # v3: the path as PLACEHOLDER
    return "-".join(map(str, fields))


def read_record(directory: Path, key: str) -> str | None:
    try:
        fd = os.open(directory / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not only_root_can_change(st) or st.st_size > MAX_RECORD:
            return None
        return os.read(fd, MAX_RECORD).decode("utf-8", "replace")
    finally:
        os.close(fd)


def write_record(directory: Path, key: str, text: str) -> None:
    """Best effort: a record that cannot be written only means asking qemu-img next time."""
    tmp = directory / f".{key}.{os.getpid()}"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # as sources/cache.py makes the cache directory
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, directory / key)
    except OSError as e:
        # The directory may be unwritable or not a directory at all (a non-root user's run with
        # the default cache): removing the temporary file fails the same way and must not escape.
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.debug("could not keep qemu-img's answer in %s: %s", directory, e.strerror)


def ask_once(path: Path, detected: DetectedImage, directory: Path | None,
             ask: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """qemu-img's answer for ``path``: the kept one if the file is unchanged, else ``ask()``, then kept.

    The answer names the path qemu-img opened (a VMDK's extents are checked against it), and a
    file used in place is opened through this process's /proc/<pid>/fd/<n>: the path is kept as
    a placeholder and put back on reading.  Only plain paths are kept, whose characters JSON
    leaves as they are."""
    name = os.fspath(path)
    if directory is None or not PLAIN_PATH.fullmatch(name):
        return ask()
    before = os.stat(path)
    key = record_key(before, detected)
    if (text := read_record(directory, key)) is not None:
        try:
            kept = json.loads(text.replace(PLACEHOLDER, name))
        except ValueError:
            kept = None  # a torn or spoilt record: ask again
        if isinstance(kept, dict):
            log.debug("qemu-img info: the answer kept for this very file (%s)", directory / key)
            return kept
    info = ask()
    text = json.dumps(info)
    if identity(os.stat(path)) == identity(before) and PLACEHOLDER not in text:  # unchanged while read
        write_record(directory, key, text.replace(name, PLACEHOLDER))
    return info
