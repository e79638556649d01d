"""One cache entry as one file: fetch an image once, give it to every node's cache.

The file (format 1) is one line of JSON, then the image's bytes, and nothing after them::

    {"format": "instance-cloudimage-cache-entry/1", "sha256": HEX, "sha512": HEX, "size": N}
    <N bytes>

Why not a tar: the reader of an untrusted file should be as small as its job.  A tar reader must
bound PAX and long-name headers and refuse links and names (image/tar.py does, for images); here
there is nothing to name, so a bounded first line and a byte count are the whole parser.  It is
still plain to look at: ``head -n1 FILE`` is the manifest, ``tail -c +$(( $(head -n1 FILE | wc
-c) + 1 )) FILE`` the image.

``import`` treats the file as untrusted input.  Nothing in it names a path (the entry is named
by the sha256 computed here); the manifest line is at most ``MAX_MANIFEST`` bytes; the image's
size must be the rest of the file exactly and within ``[Images] MaxDownloadSize`` and ``[Cache]
MaxSize``; both digests are computed while the bytes are copied into a locked temp file, which
becomes an entry only when they match the manifest.  Nothing else is taken from the file, and
no URL index entry is written: a create uses an entry only when the node itself expects its
digest (a pinned checksum or the variant's checksum file, sources/remote.py), so an imported
entry never stands in for an image nobody asked for by digest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instance_cloudimage.runtime.errors import ChecksumMismatch, ImageFetchError, ParameterError
from instance_cloudimage.runtime.log import Progress, format_size
from instance_cloudimage.sources.cache import SHA256_RE, Cache
from instance_cloudimage.sources.spool import CHUNK, Hasher

log = logging.getLogger(__name__)

FORMAT = "instance-cloudimage-cache-entry/1"
MAX_MANIFEST = 4096
SHA512_RE = re.compile(r"^[0-9a-f]{128}$")
PREFIX_RE = re.compile(r"^(sha256:)?([0-9a-f]{12,64})$")


@dataclass(frozen=True)
class Manifest:
    sha256: str
    size: int
    sha512: str | None = None

    def line(self) -> bytes:
        data: dict[str, Any] = {"format": FORMAT, "sha256": self.sha256, "size": self.size}
        if self.sha512:
            data["sha512"] = self.sha512
        return json.dumps(data, sort_keys=True).encode() + b"\n"


def find_entry(cache: Cache, digest: str) -> str:
    """The sha256 of the one entry named by ``sha256:HEX`` or a hex prefix of 12 digits or more."""
    m = PREFIX_RE.match(digest.strip().lower())
    if m is None:
        raise ParameterError(f"{digest!r} is not a sha256 digest",
                             "give sha256:HEX as 'cache fetch' prints it, or 12 or more hex digits")
    matches = sorted(e.sha256 for e in cache.list_entries() if e.sha256.startswith(m.group(2)))
    if len(matches) != 1:
        what = "no cached image" if not matches else f"{len(matches)} cached images"
        raise ParameterError(f"{what} with sha256 {m.group(2)}", "see 'instance-cloudimage cache list'")
    return matches[0]


def export_entry(cache: Cache, sha256: str, dest: Path) -> Manifest:
    """Write the entry (re-verified first) to ``dest``, replaced only once the file is complete."""
    handle = cache.open_entry(sha256, ["sha512"])
    if handle is None:
        raise ImageFetchError(f"the cached image sha256:{sha256} is gone or was corrupt",
                              "fetch it again with 'instance-cloudimage cache fetch'")
    manifest = Manifest(sha256, handle.size, handle.digests.get("sha512"))
    try:
        # Next to dest, so the final rename is atomic; 0600: an image parameter's image may be private.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            os.write(fd, manifest.line())
            pos = 0
            while pos < handle.size:
                n = os.sendfile(fd, handle.fd, pos, min(handle.size - pos, 64 * CHUNK))
                if n == 0:
                    raise ImageFetchError(f"the cached image sha256:{sha256} shrank while it was exported")
                pos += n
            os.close(fd)
            fd = -1
            os.replace(tmp, dest)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            raise
    except OSError as e:
        raise ImageFetchError(f"cannot write {dest}: {e.strerror}") from None
    finally:
        handle.close()
    return manifest


def not_an_export(src: Path, why: str) -> ImageFetchError:
    return ImageFetchError(f"{src} is not an instance-cloudimage cache export ({why}); nothing was imported",
                           "make it with 'instance-cloudimage cache export' on the node that has the image")


def parse_manifest(src: Path, head: bytes) -> tuple[Manifest, int]:
    """The manifest line at the start of ``head``, and the offset of the image's first byte."""
    end = head.find(b"\n")
    if end < 0:
        raise not_an_export(src, f"no manifest line in its first {MAX_MANIFEST} bytes")
    try:
        data = json.loads(head[:end])
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise not_an_export(src, f"its first line is not a manifest of format {FORMAT}")
    sha256, size, sha512 = data.get("sha256"), data.get("size"), data.get("sha512")
    if set(data) - {"format", "sha256", "size", "sha512"} or not isinstance(sha256, str) \
            or not SHA256_RE.match(sha256) or type(size) is not int or size < 0 \
            or not (sha512 is None or isinstance(sha512, str) and SHA512_RE.match(sha512)):
        raise not_an_export(src, "its manifest is malformed")
    return Manifest(sha256, size, sha512), end + 1


def check_size(src: Path, manifest: Manifest, rest: int, cache: Cache, max_download: int) -> None:
    if rest != manifest.size:
        raise not_an_export(src, f"the manifest names {manifest.size} bytes of image, the file holds {rest}")
    if manifest.size > max_download:
        raise ImageFetchError(f"{src} holds an image of {format_size(manifest.size)}, more than "
                              f"[Images] MaxDownloadSize ({format_size(max_download)}); nothing was imported")
    if manifest.size > cache.max_size:
        raise ImageFetchError(f"{src} holds an image of {format_size(manifest.size)}, more than "
                              f"[Cache] MaxSize ({format_size(cache.max_size)}); nothing was imported")


def copy_hashed(src_fd: int, offset: int, size: int, dst_fd: int, what: str) -> dict[str, str]:
    """Copy ``size`` bytes from ``offset`` while hashing them (sha256 and sha512)."""
    hasher = Hasher(["sha512"])
    pos = 0
    with Progress(f"importing {what}", size) as progress:
        while pos < size:
            chunk = os.pread(src_fd, min(4 * CHUNK, size - pos), offset + pos)
            if not chunk:
                raise ImageFetchError(f"{what} shrank while it was imported; nothing was imported")
            os.pwrite(dst_fd, chunk, pos)
            hasher.update(chunk)
            pos += len(chunk)
            progress.update(len(chunk))
    if os.pread(src_fd, 1, offset + size):
        raise ImageFetchError(f"{what} grew while it was imported; nothing was imported")
    return hasher.digests()


def import_entry(cache: Cache, src: Path, max_download: int) -> tuple[Manifest, bool]:
    """Import an exported entry; return its manifest and whether it was new (else already cached)."""
    try:
        # O_NONBLOCK: a FIFO named by mistake would otherwise block the open forever.
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ImageFetchError(f"cannot read {src}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_an_export(src, "not a regular file")
        os.set_blocking(fd, True)
        manifest, offset = parse_manifest(src, os.pread(fd, MAX_MANIFEST, 0))
        check_size(src, manifest, st.st_size - offset, cache, max_download)
        existing = cache.open_entry(manifest.sha256, ["sha512"])
        if existing is not None:
            existing.close()
            return manifest, False
        cache.evict(reserve=manifest.size)
        tmp_fd, temp = cache.new_temp(f"import-{manifest.sha256[:16]}")
        try:
            digests = copy_hashed(fd, offset, manifest.size, tmp_fd, os.fspath(src))
            for algorithm in ("sha256", "sha512"):
                expected = getattr(manifest, algorithm)
                if expected is not None and digests[algorithm] != expected:
                    raise ChecksumMismatch(f"{src} does not match the {algorithm} its manifest names; "
                                           "nothing was imported", "copy the file again from the node that exported it")
            cache.commit(tmp_fd, temp, digests, manifest.size)
        finally:
            os.close(tmp_fd)
            temp.unlink(missing_ok=True)  # gone after a commit; else the failed copy
        cache.evict()
        return manifest, True
    finally:
        os.close(fd)
