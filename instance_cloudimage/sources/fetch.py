"""Where the image comes from: a local path, an http(s) URL, or the built-in demo image.

``resolve_image`` decides *what* to fetch (the variant's image, or the ``image`` parameter);
``open_image`` returns an ``ImageStream`` over its bytes, and ``fetch_image`` the verified file.
Remote images go through the cache (sources/remote.py, sources/cache.py).  A local file that only root can
change is used in place, through the descriptor opened after the path checks (qemu-img gets
``/proc/<pid>/fd/<n>``, so a path swapped afterwards changes nothing); any other local file is
first copied into a private spool while it is hashed, so qemu-img reads bytes nobody else can
change after they were checked.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.runtime.errors import ChecksumMismatch, ParameterError
from instance_cloudimage.runtime.localpath import (
    only_root_can_change,
    open_local_image,
    pinned_path,
    resolve_local_image,
)
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.sources.cache import make_cache
from instance_cloudimage.sources.checksums import Digest, lookup_required
from instance_cloudimage.sources.demo import build_demo_image
from instance_cloudimage.sources.spool import CHUNK, Hasher, Spool, copy_file, hash_fd
from instance_cloudimage.sources.urlpolicy import PARAMETER_URL, redact_url

if TYPE_CHECKING:
    from instance_cloudimage.sources.remote import RemoteSpec  # imported where used: see open_remote_image

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class ImageRef:
    location: str
    declared_format: str  # "auto" or a DiskFormat name
    checksum: str | None
    checksum_url: str | None = None
    signature_url: str | None = None
    keyring: str | None = None
    from_parameter: bool = False
    name_pattern: str | None = None  # pick the file name from the checksum file (URL has {name})
    variant: str | None = None

    @property
    def scheme(self) -> str:
        if self.location.startswith(BUILTIN_PREFIX):
            return "builtin"
        return urlsplit(self.location).scheme.lower() or "path"

    def describe(self) -> str:
        # A user-given location may be private; the variant's is public.
        if self.from_parameter:
            return PARAMETER_URL if self.scheme in ("http", "https") else "the file given by the image parameter"
        return redact_url(self.location)

    def remote_spec(self) -> RemoteSpec:
        from instance_cloudimage.sources.remote import RemoteSpec

        return RemoteSpec(url=self.location, checksum=self.checksum, checksum_url=self.checksum_url,
                          signature_url=self.signature_url, keyring=self.keyring,
                          name_pattern=self.name_pattern, from_parameter=self.from_parameter,
                          variant=self.variant)


@dataclass(frozen=True)
class FetchedImage:
    path: Path
    size: int
    # Computed on demand: a local file used in place has not been hashed unless a checksum asked.
    sha256: Callable[[], str] = field(repr=False, compare=False)

    @cached_property
    def digest(self) -> str:
        """"sha256:<hex>" of the bytes as fetched."""
        return "sha256:" + self.sha256()


def known(value: str) -> Callable[[], str]:
    return lambda: value


def resolve_image(variant: Variant, params: Mapping[str, str], arch: str) -> ImageRef:
    """The image to use: the ``image`` parameter if given, else the variant's for ``arch``."""
    p = params
    checksum = p.get("image_checksum", "").strip().lower() or None
    if p.get("image"):
        return ImageRef(location=p["image"].strip(), declared_format="auto", checksum=checksum,
                        from_parameter=True)
    spec = variant.image_for(arch)
    return ImageRef(location=spec.url, declared_format=spec.format, checksum=checksum or spec.checksum,
                    checksum_url=spec.checksum_url, signature_url=spec.signature_url, keyring=spec.keyring,
                    name_pattern=spec.name_pattern, variant=variant.name)


class ImageStream:
    """The image's bytes as fetched (still compressed/wrapped), read sequentially.

    This is the seam between sources and writers: a writer that can stream (raw, compressed
    raw) reads from ``read``/``readinto`` and calls ``finish()`` at the end, which waits for
    the rest, verifies the checksum and returns the verified file; a writer that needs random
    access (qcow2, vmdk, ...) calls ``finish()`` straight away and uses the file.  ``peek``
    shows the next bytes without consuming them, for detection.

    On a cache miss the bytes are those of a download still in progress (a producer thread
    tees the HTTP body into the cache's temp file); ``read`` returns end-of-file only once the
    whole body has been verified, and raises the download's error otherwise.  On a hit, and for
    local files, the stream reads an already verified file.  ``size`` is the byte count when
    known in advance (Content-Length), else None.
    """

    def __init__(self, spool: Spool, result: Callable[[], FetchedImage], size: int | None,
                 local_path: Path | None = None) -> None:
        self._spool = spool
        self._result = result
        self._pos = 0
        self.size = size
        # Set only when the whole verified image is already a local file (a cache hit): the
        # writer may then let qemu-img copy it, which skips holes at the disk's speed.
        self.local_path = local_path

    def peek(self, n: int) -> bytes:
        avail = self._spool.wait(self._pos + n)
        return os.pread(self._spool.fd, max(0, min(n, avail - self._pos)), self._pos)

    def read(self, n: int = CHUNK) -> bytes:
        if n <= 0:
            return b""
        avail = self._spool.wait(self._pos + 1)
        take = min(n, avail - self._pos)
        if take <= 0:
            return b""
        data = os.pread(self._spool.fd, take, self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        view = memoryview(buf).cast("B")
        if not len(view):
            return 0
        avail = self._spool.wait(self._pos + 1)
        take = min(len(view), avail - self._pos)
        if take <= 0:
            return 0
        n = os.preadv(self._spool.fd, [view[:take]], self._pos)
        self._pos += n
        return n

    def finish(self) -> FetchedImage:
        """Wait for the whole image, verified; raises the download's or the checksum's error."""
        self._spool.join()
        return self._result()

    def close(self) -> None:
        self._spool.cancel(timeout=5.0)


def open_image(ref: ImageRef, site: SiteConfig, stack: ExitStack) -> ImageStream:
    """Open the image for sequential reading; cleanup (locks, temp files) goes on ``stack``."""
    scheme = ref.scheme
    if scheme in ("http", "https"):
        stream = open_remote_image(ref, site, stack)
    elif scheme == "builtin":
        demo = build_demo_image(ref.location[len(BUILTIN_PREFIX):], site.paths.cache_dir)
        stream = open_local(demo, demo.parent, ref, site, stack)
    elif scheme in ("path", "file"):
        raw = urlsplit(ref.location).path if scheme == "file" else ref.location
        path, root = resolve_local_image(raw, site, what="image")
        stream = open_local(path, root, ref, site, stack)
    else:
        raise ParameterError(f"image URL scheme '{scheme}' is not supported",
                             "use https://, http://, file:// or an absolute path")
    stack.callback(stream.close)
    return stream


def fetch_image(ref: ImageRef, site: SiteConfig, stack: ExitStack) -> FetchedImage:
    """Fetch and verify the image; the returned file stays valid until ``stack`` closes."""
    return open_image(ref, site, stack).finish()


def open_remote_image(ref: ImageRef, site: SiteConfig, stack: ExitStack) -> ImageStream:
    # Imported here: the HTTP stack (requests, urllib3) costs a tenth of a second to import,
    # which a local image should not pay.
    from instance_cloudimage.sources.remote import open_remote

    opening = open_remote(ref.remote_spec(), site, stack)
    if opening.handle is not None:
        handle = opening.handle
        stack.callback(handle.close)
        fetched = FetchedImage(handle.path, handle.size, known(handle.digests["sha256"]))
        return ImageStream(Spool(handle.fd, filled=handle.size, done=True), lambda: fetched, handle.size,
                           local_path=Path(handle.path))
    assert opening.spool is not None and opening.result is not None
    result = opening.result

    def done() -> FetchedImage:
        return FetchedImage(Path(result.path), result.size, known(result.sha256))

    return ImageStream(opening.spool, done, opening.size)


def expected_local_digest(ref: ImageRef, path: Path, site: SiteConfig) -> Digest | None:
    if ref.checksum:
        return Digest.parse(ref.checksum)
    if ref.checksum_url:
        from instance_cloudimage.sources.remote import resolve_checksums

        checksums = resolve_checksums(ref.remote_spec(), site, make_cache(site))
        return lookup_required(checksums, [posixpath.basename(os.fspath(path)),
                                           posixpath.basename(urlsplit(ref.location).path)])
    return None


def close_unless_busy(fd: int, box: list[Spool]) -> None:
    """Close ``fd`` unless a producer thread that may still use it is alive (see sources/remote.py)."""
    thread = box[0].thread if box else None
    if thread is None or not thread.is_alive():
        os.close(fd)


def open_local(path: Path, root: Path, ref: ImageRef, site: SiteConfig, stack: ExitStack) -> ImageStream:
    """The file at the resolved ``path``, opened beneath ``root`` (its allowed directory)."""
    expected = expected_local_digest(ref, path, site)
    src = open_local_image(path, root)
    st = os.fstat(src)
    if only_root_can_change(st):
        return open_in_place(src, st.st_size, expected, ref, stack)
    log.info("copying the image file first: users other than root can change it (uid %d, mode %o)",
             st.st_uid, stat.S_IMODE(st.st_mode))
    return copy_local(src, st.st_size, expected, ref, site, stack)


def open_in_place(src: int, total: int, expected: Digest | None, ref: ImageRef, stack: ExitStack) -> ImageStream:
    """Read the file through its descriptor; verify it (if a checksum is expected) as it is read."""
    box: list[Spool] = []
    stack.callback(close_unless_busy, src, box)
    # The pinned inode, for qemu-img and hooks: reopening this never follows the original path.
    pinned = Path(pinned_path(src))
    known_sha256: list[str] = []

    def sha256() -> str:
        if not known_sha256:
            hasher = Hasher()
            hash_fd(src, hasher, total=total, what=None)
            known_sha256.append(hasher.digests()["sha256"])
        return known_sha256[0]

    if expected is None:
        spool = Spool(src, filled=total, done=True)
    else:
        spool = Spool(src)
        box.append(spool)

        def produce() -> None:
            hasher = Hasher([expected.algorithm])
            hash_fd(src, hasher, total=total, what="the image file", spool=spool)
            known_sha256.append(check_digest(hasher, expected, ref))

        spool.start(produce, name="verify")
    return ImageStream(spool, lambda: FetchedImage(pinned, total, sha256), total, local_path=pinned)


def check_digest(hasher: Hasher, expected: Digest | None, ref: ImageRef) -> str:
    """Raise ChecksumMismatch unless the hashed bytes match ``expected``; return their sha256."""
    digests = hasher.digests()
    if expected is not None and digests[expected.algorithm] != expected.hexdigest:
        raise ChecksumMismatch(f"{ref.describe()} does not match its {expected.algorithm} checksum",
                               "the file is corrupt or the checksum is wrong")
    return digests["sha256"]


def copy_local(src: int, total: int, expected: Digest | None, ref: ImageRef, site: SiteConfig,
               stack: ExitStack) -> ImageStream:
    """Copy the file into a private spool while hashing it (in a producer thread)."""
    box: list[Spool] = []
    stack.callback(close_unless_busy, src, box)
    cache = make_cache(site)
    fd, spool_path = cache.new_temp("local")
    spool = Spool(fd)
    box.append(spool)
    stack.callback(close_unless_busy, fd, box)
    stack.callback(spool_path.unlink, missing_ok=True)
    hasher = Hasher([expected.algorithm] if expected else [])
    sha256 = []

    def produce() -> None:
        size = copy_file(src, spool, hasher, total=total, what="the image file")
        sha256.append((size, check_digest(hasher, expected, ref)))

    spool.start(produce, name="copy")

    def done() -> FetchedImage:
        size, digest = sha256[0]
        return FetchedImage(spool_path, size, known(digest))

    # No local_path: the spool is still being filled while the writer reads it.
    return ImageStream(spool, done, total)
