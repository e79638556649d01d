"""The image cache: content-addressed, verified, locked, size-capped.

Layout under the cache directory (``[Cache]``; /var/cache/instance-cloudimage by default),
every directory mode 0700::

    images/<sha256>        verified image bytes, named by their SHA-256; atime = last use
    images/<sha256>.json   the digests known for it (sha256, and sha512 once computed), size
    urls/<key>.json        per source URL: the sha256 it gave last, ETag, Last-Modified, which
                           URL answered (a mirror or upstream), the variant; the URL itself only
                           for variant URLs (an image parameter's URL may be private)
    locks/<key>.lock       one lock per URL: held exclusively while that URL is revalidated
                           or downloaded, so concurrent creates download once
    tmp/<key>.<random>     downloads in progress, locked by their writer
    small/<key>.*          checksum files and signatures with their validators

``<key>`` is the first 40 hex digits of the SHA-256 of the URL.  An entry is written under
tmp/, verified while it streams, and renamed into images/ only after verification.  Every user
of an entry holds a shared ``flock`` on it while it is in use; eviction takes an exclusive
non-blocking lock, so it never removes an entry in use.  Entries are re-hashed (SHA-256) before
each reuse, so a corrupted one is detected and fetched again; for the same reason entries are
not fsynced (a torn write after a crash is caught the same way).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from instance_cloudimage.runtime.errors import ConfigError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.sources.spool import Hasher, hash_fd

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 3600
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class UrlEntry:
    sha256: str
    source_key: str
    etag: str | None = None
    last_modified: str | None = None
    url: str | None = None
    variant: str | None = None
    fetched: float = 0.0


@dataclass
class Handle:
    """An entry opened for use: ``fd`` holds a shared lock until ``close``."""

    fd: int
    path: Path
    size: int
    digests: dict[str, str]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class EntryInfo:
    sha256: str
    size: int
    last_used: float
    in_use: bool
    sources: tuple[str, ...]


def unusable_cache(root: Path, e: OSError) -> ConfigError:
    why = "it is not a directory" if isinstance(e, FileExistsError) else e.strerror
    return ConfigError(f"the image cache {root} cannot be used: {why}",
                       "check the --cache-dir given to 'instance-cloudimage install'")


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:40]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _try_lock(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


class Cache:
    def __init__(self, root: Path, max_size: int) -> None:
        self.root = root
        self.max_size = max_size
        self.images = root / "images"
        self.urls = root / "urls"
        self.locks = root / "locks"
        self.tmp = root / "tmp"
        self.small = root / "small"

    def setup(self) -> None:
        """Create the directories.  Raises ConfigError when the cache directory is unusable."""
        try:
            for d in (self.root, self.images, self.urls, self.locks, self.tmp, self.small):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise unusable_cache(self.root, e) from None

    # --- locks and the URL index ---------------------------------------------------------------

    def lock_url(self, key: str) -> int:
        """Take the URL's exclusive lock (waiting for another process if needed); return its fd."""
        fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _try_lock(fd, fcntl.LOCK_EX):
            log.info("waiting for another process that is fetching the same image")
            fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def read_index(self, key: str) -> UrlEntry | None:
        """The index entry of a URL, or None when there is none or it is not one of ours."""
        data = _read_json(self.urls / f"{key}.json")
        if not data:
            return None
        try:
            entry = UrlEntry(**data)
        except TypeError:
            return None
        texts = (entry.etag, entry.last_modified, entry.url, entry.variant)
        if not (isinstance(entry.sha256, str) and SHA256_RE.match(entry.sha256) and isinstance(entry.source_key, str)
                and all(t is None or isinstance(t, str) for t in texts)
                and isinstance(entry.fetched, int | float)):
            return None
        return entry

    def write_index(self, key: str, entry: UrlEntry) -> None:
        _write_json(self.urls / f"{key}.json", asdict(entry))

    # --- entries -------------------------------------------------------------------------------

    def image_path(self, sha256: str) -> Path:
        return self.images / sha256

    def find(self, algorithm: str, hexdigest: str) -> str | None:
        """The sha256 name of an entry known to have this digest."""
        if algorithm == "sha256":
            return hexdigest if self.image_path(hexdigest).is_file() else None
        for meta_path in self.images.glob("*.json"):
            meta = _read_json(meta_path) or {}
            if meta.get(algorithm) == hexdigest and self.image_path(meta_path.stem).is_file():
                return meta_path.stem
        return None

    def open_entry(self, sha256: str, algorithms: Iterable[str] = ()) -> Handle | None:
        """Open, share-lock and re-verify an entry; None when absent or corrupt (then removed)."""
        path = self.image_path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:  # a symlink or worse where an entry should be: not ours, not used
            log.warning("ignoring %s in the image cache: %s", path, e.strerror)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                log.warning("ignoring %s in the image cache: not a regular file", path)
                os.close(fd)
                return None
            try:
                if os.stat(path).st_ino != st.st_ino:
                    raise FileNotFoundError(path)  # evicted and replaced while we waited
            except FileNotFoundError:
                os.close(fd)
                return None
            hasher = Hasher(algorithms)
            pos = hash_fd(fd, hasher, total=st.st_size, what="the cached image")
            digests = hasher.digests()
            if digests["sha256"] != sha256:
                log.warning("the cached copy of the image is corrupt; fetching it again")
                path.unlink(missing_ok=True)
                os.close(fd)
                return None
            meta = _read_json(self.images / f"{sha256}.json") or {}
            if any(meta.get(a) != v for a, v in digests.items()):
                meta.update(digests)
                meta["size"] = pos
                _write_json(self.images / f"{sha256}.json", meta)
            self.touch(path)
            return Handle(fd, path, pos, {**{k: v for k, v in meta.items() if k in ("sha256", "sha512")},
                                          **digests})
        except BaseException:
            os.close(fd)
            raise

    def touch(self, path: Path) -> None:
        st = path.stat()
        os.utime(path, (time.time(), st.st_mtime))

    def new_temp(self, key: str) -> tuple[int, Path]:
        """A private temp file locked by its writer (so prune can tell it is alive)."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=f"{key}.", suffix=".part")
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, Path(name)

    def remove_stale_temps(self, pattern: str = "*", min_age: float = 0.0) -> int:
        removed = 0
        now = time.time()
        for name in glob.glob(os.fspath(self.tmp / pattern)):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= min_age and _try_lock(fd, fcntl.LOCK_EX):
                    os.unlink(name)
                    removed += 1
            finally:
                os.close(fd)
        return removed

    def commit(self, fd: int, temp: Path, digests: dict[str, str], size: int) -> Path:
        """Rename a verified temp file into images/; ``fd`` keeps a shared lock on it."""
        fcntl.flock(fd, fcntl.LOCK_SH)
        sha256 = digests["sha256"]
        meta = {**(_read_json(self.images / f"{sha256}.json") or {}), **digests, "size": size}
        _write_json(self.images / f"{sha256}.json", meta)
        path = self.image_path(sha256)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
        self.touch(path)
        return path

    # --- eviction, listing ---------------------------------------------------------------------

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for p in self.images.iterdir():
            if p.suffix == ".json" or p.name.startswith("."):
                continue
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):  # anything else was not put there by us: leave it alone
                out.append((st.st_atime, st.st_size, p.name))
        return out

    def remove_entry(self, sha256: str) -> bool:
        """Remove an entry unless someone uses it."""
        path = self.image_path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            if not _try_lock(fd, fcntl.LOCK_EX):
                return False
            path.unlink(missing_ok=True)
            (self.images / f"{sha256}.json").unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    def evict(self, reserve: int = 0) -> int:
        """Remove least recently used entries not in use until the cap (minus ``reserve``) holds."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        limit = self.max_size - reserve
        freed = 0
        for _, size, sha256 in entries:
            if total <= limit:
                break
            if self.remove_entry(sha256):
                log.info("evicted cached image %s (%d bytes, least recently used)", sha256[:16], size)
                total -= size
                freed += size
        return freed

    def in_use(self, sha256: str) -> bool:
        try:
            fd = os.open(self.image_path(sha256), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            return not _try_lock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)

    def list_entries(self) -> list[EntryInfo]:
        sources: dict[str, list[str]] = {}
        for p in self.urls.glob("*.json"):
            e = self.read_index(p.stem)
            if e is not None:
                label = e.variant and f"variant {e.variant}" or "image parameter"
                sources.setdefault(e.sha256, []).append(f"{label}: {e.url}" if e.url else label)
        return [EntryInfo(sha, size, atime, self.in_use(sha), tuple(sources.get(sha, ())))
                for atime, size, sha in sorted(self._entries(), reverse=True)]

    def prune(self, everything: bool = False) -> tuple[int, int]:
        """Drop stale temp files and index entries, then evict to the cap (or all not in use)."""
        self.remove_stale_temps(min_age=STALE_TEMP_SECONDS)
        removed = freed = 0
        if everything:
            for _, size, sha in self._entries():
                if self.remove_entry(sha):
                    removed += 1
                    freed += size
        else:
            before = len(self._entries())
            freed = self.evict()
            removed = before - len(self._entries())
        for p in self.urls.glob("*.json"):
            e = self.read_index(p.stem)
            if e is None or not self.image_path(e.sha256).exists():
                p.unlink(missing_ok=True)
        return removed, freed

    # --- small files (checksum files, signatures) -----------------------------------------------

    def read_small(self, key: str) -> tuple[dict[str, Any], bytes] | None:
        meta = _read_json(self.small / f"{key}.json")
        try:
            body = (self.small / f"{key}.body").read_bytes()
        except OSError:
            return None
        if meta is None or meta.get("sha256") != hashlib.sha256(body).hexdigest():
            return None
        return meta, body

    def write_small(self, key: str, meta: dict[str, Any], body: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.small, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, self.small / f"{key}.body")
        _write_json(self.small / f"{key}.json", {**meta, "sha256": hashlib.sha256(body).hexdigest()})


def make_cache(site: SiteConfig) -> Cache:
    """The site's image cache, set up (it needs nothing of the HTTP stack, unlike sources/remote.py)."""
    cache = Cache(site.paths.cache_dir, int(site.get("cache_max_size")))
    cache.setup()
    return cache

