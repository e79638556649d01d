"""Remote images: checksum files, mirrors, the cache and the download, put together.

``open_remote`` decides between three paths, cheapest first:

1. the expected digest is known (pinned, or from the checksum file), the URL passes the URL
   policy (for the image parameter's URL: its host resolves here to addresses the policy
   allows) and the cache holds an entry with that digest: no request for the image at all;
2. the cache holds what this URL gave last time: a conditional GET (If-None-Match /
   If-Modified-Since) to the source that answered then; 304 means reuse, with no body;
3. otherwise a download, teed into a cache temp file while the writer consumes it.

Paths 2 and 3 run under the URL's lock, so concurrent creates of one uncached image download it
once: the others wait, then find it cached.
"""

from __future__ import annotations

import logging
import os
import posixpath
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from instance_cloudimage.runtime.errors import ChecksumMismatch, ConfigError, ImageFetchError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.sources.cache import Cache, Handle, UrlEntry, make_cache, url_key
from instance_cloudimage.sources.checksums import ChecksumList, Digest, lookup_required, parse_checksum_file
from instance_cloudimage.sources.download import BodyDownload, Hasher, Spool
from instance_cloudimage.sources.http import HttpClient, Opened
from instance_cloudimage.sources.mirrors import candidate_urls
from instance_cloudimage.sources.signature import Verifier, keyring_path, strip_clearsign
from instance_cloudimage.sources.urlpolicy import UrlPolicy, check_plain_http, may_use_cache, policy_for, redact_url

log = logging.getLogger(__name__)

SMALL_FILE_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class RemoteSpec:
    """What open_remote needs from an ImageRef (kept separate to avoid an import cycle)."""

    url: str
    checksum: str | None
    checksum_url: str | None
    signature_url: str | None
    keyring: str | None
    name_pattern: str | None
    from_parameter: bool
    variant: str | None


@dataclass
class Result:
    path: str = ""
    size: int = 0
    sha256: str = ""


class LockHolder:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._mutex = threading.Lock()

    def release(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def basename_of(url: str) -> str:
    return posixpath.basename(unquote(urlsplit(url).path))


# --- checksum files and signatures ---------------------------------------------------------------

def read_body(opened: Opened, limit: int, what: str) -> bytes:
    try:
        body = opened.response.raw.read(limit + 1, decode_content=False)
    except Exception:
        raise ImageFetchError(f"the transfer of {what} broke off") from None
    if len(body) > limit:
        raise ImageFetchError(f"{what} is larger than {limit} bytes, which is not a checksum file")
    return bytes(body)


def fetch_small(url: str, site: SiteConfig, cache: Cache, what: str) -> bytes:
    """A checksum file or signature named by a variant: mirrors first, cached with validators."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("", "file"):
        path = urlsplit(url).path if scheme == "file" else url
        try:
            with open(path, "rb") as f:
                return f.read(SMALL_FILE_LIMIT)
        except OSError as e:
            raise ImageFetchError(f"{what} cannot be read: {e.strerror}") from None
    key = url_key(url)
    cached = cache.read_small(key)
    for cand in candidate_urls(url, site):
        client = HttpClient(site, UrlPolicy())
        cwhat = f"{what} from mirror {redact_url(cand.url)}" if cand.mirror else what
        headers = {}
        if cached and cached[0].get("source_key") == url_key(cand.url):
            if cached[0].get("etag"):
                headers["If-None-Match"] = cached[0]["etag"]
            if cached[0].get("last_modified"):
                headers["If-Modified-Since"] = cached[0]["last_modified"]
        try:
            try:
                opened = client.open(cand.url, headers, what=cwhat)
                try:
                    if opened.status == 304 and cached:
                        return cached[1]
                    if opened.status != 200:
                        raise ImageFetchError(f"{cwhat}: unexpected HTTP {opened.status}")
                    body = read_body(opened, SMALL_FILE_LIMIT, cwhat)
                finally:
                    opened.close()
            finally:
                client.close()
        except ImageFetchError as e:
            if cand.mirror:
                log.warning("%s; trying the next source", e)
                continue
            raise
        cache.write_small(key, {"etag": opened.header("ETag"), "last_modified": opened.header("Last-Modified"),
                                "source_key": url_key(cand.url)}, body)
        return body
    raise AssertionError("the upstream URL is always the last candidate")


def resolve_checksums(spec: RemoteSpec, site: SiteConfig, cache: Cache) -> ChecksumList:
    """Fetch the checksum file and check its signature when the variant asks for one."""
    assert spec.checksum_url is not None
    what = f"checksum file {redact_url(spec.checksum_url)}"
    data = fetch_small(spec.checksum_url, site, cache, what)
    if spec.signature_url:
        if not spec.keyring:
            raise ConfigError(f"variant {spec.variant} has a SignatureURL but no Keyring")
        verifier = Verifier(keyring_path(spec.keyring, site), cache.tmp)
        try:
            if spec.signature_url.strip().lower() == "inline":
                data = verifier.verify_clearsigned(data, what)
            else:
                sig = fetch_small(spec.signature_url, site, cache, f"signature {redact_url(spec.signature_url)}")
                verifier.verify_detached(data, sig, what)
        finally:
            verifier.close()
        text = data.decode("utf-8", errors="replace")
    else:
        text = strip_clearsign(data.decode("utf-8", errors="replace"))
    return parse_checksum_file(text, redact_url(spec.checksum_url))


# --- the image -------------------------------------------------------------------------------------

def open_cached(cache: Cache, expected: Digest) -> Handle | None:
    sha256 = cache.find(expected.algorithm, expected.hexdigest)
    if sha256 is None:
        return None
    handle = cache.open_entry(sha256, [expected.algorithm])
    if handle is not None and handle.digests.get(expected.algorithm) != expected.hexdigest:
        handle.close()
        return None
    return handle


@dataclass
class Opening:
    """What a started transfer needs to know; returned by open_remote's helpers."""

    handle: Handle | None = None
    spool: Spool | None = None
    result: Result | None = None
    size: int | None = None


def open_remote(spec: RemoteSpec, site: SiteConfig, stack: ExitStack) -> Opening:
    """Find or fetch the image at ``spec.url``; see the module docstring.  Raises UserError."""
    if spec.from_parameter:
        check_plain_http(spec.url, bool(spec.checksum), site)
    policy = policy_for(spec.from_parameter, site, pinned=bool(spec.checksum))
    cache = make_cache(site)
    expected = Digest.parse(spec.checksum) if spec.checksum else None
    checksums: ChecksumList | None = None
    url = spec.url
    if expected is None and spec.checksum_url:
        checksums = resolve_checksums(spec, site, cache)
        if spec.name_pattern:
            url = url.replace("{name}", checksums.pick(spec.name_pattern))
        expected = checksums.lookup(basename_of(url))
    elif spec.name_pattern:
        raise ConfigError(f"variant {spec.variant}: NamePattern needs a ChecksumURL to pick the name from")
    what = policy.describe(url)
    # Security: the digest alone is no permission; the URL must pass the policy before a cache hit.
    by_digest = expected is not None and may_use_cache(url, policy)

    if by_digest and expected is not None and (handle := open_cached(cache, expected)) is not None:
        log.info("using the cached image (verified %s)", expected.algorithm)
        return Opening(handle=handle)

    key = url_key(url)
    lock = LockHolder(cache.lock_url(key))
    stack.callback(lock.release)
    if by_digest and expected is not None and (handle := open_cached(cache, expected)) is not None:
        lock.release()
        log.info("using the image another process just fetched")
        return Opening(handle=handle)
    cache.remove_stale_temps(f"{key}.*")
    entry = cache.read_index(key)

    for cand in candidate_urls(url, site):
        # A mirror of the image parameter's URL: the site's mirror host is trusted, its redirects are not.
        client = HttpClient(site, policy.for_mirror(cand.origin) if cand.mirror else policy)
        stack.callback(client.close)
        cwhat = what
        if cand.mirror:
            cwhat = f"mirror {redact_url(cand.base)} for {what}" if spec.from_parameter \
                else f"mirror {redact_url(cand.url)}"
        headers: dict[str, str] = {}
        if entry is not None and expected is None and entry.source_key == url_key(cand.url) \
                and cache.image_path(entry.sha256).exists():
            if entry.etag:
                headers["If-None-Match"] = entry.etag
            if entry.last_modified:
                headers["If-Modified-Since"] = entry.last_modified
        try:
            opened = client.open(cand.url, headers, what=cwhat)
        except ImageFetchError as e:
            if cand.mirror:
                log.warning("%s; trying the next source", e)
                continue
            raise
        if opened.status == 304 and entry is not None:
            opened.close()
            handle = cache.open_entry(entry.sha256)
            if handle is not None:
                entry.fetched = time.time()
                cache.write_index(key, entry)
                lock.release()
                log.info("the cached image is up to date (HTTP 304)")
                return Opening(handle=handle)
            opened = client.open(cand.url, {}, what=cwhat)
        if opened.status != 200:
            opened.close()
            raise ImageFetchError(f"{cwhat}: unexpected HTTP {opened.status}")
        if expected is None and checksums is not None:
            expected = lookup_required(checksums, [basename_of(opened.url), basename_of(url)])
        if cand.mirror:
            log.info("downloading from %s", cwhat)
        return start_download(cache, key, lock, client, cand.url, opened, expected, spec, site, stack, what)
    raise AssertionError("the upstream URL is always the last candidate")


def start_download(cache: Cache, key: str, lock: LockHolder, client: HttpClient, source_url: str,
                   opened: Opened, expected: Digest | None, spec: RemoteSpec, site: SiteConfig,
                   stack: ExitStack, what: str) -> Opening:
    fd, temp = cache.new_temp(key)
    spool = Spool(fd)

    def drop_temp() -> None:
        temp.unlink(missing_ok=True)
        # A producer still blocked in a read owns the fd: closing it could let the number be
        # reused under its pwrite.  The process is ending anyway.
        if spool.thread is None or not spool.thread.is_alive():
            os.close(fd)

    stack.callback(drop_temp)
    length = opened.header("Content-Length")
    size = int(length) if length and length.isdigit() else None
    if size is not None:
        cache.evict(reserve=size)
    hasher = Hasher([expected.algorithm] if expected else [])
    body = BodyDownload(client, source_url, opened, spool, hasher,
                        max_size=int(site.get("max_download_size")), what=what)
    result = Result()

    def produce() -> None:
        try:
            body.run()
            digests = hasher.digests()
            if expected is not None and digests[expected.algorithm] != expected.hexdigest:
                raise ChecksumMismatch(f"{what} does not match its {expected.algorithm} checksum; nothing was cached",
                                       "the download is corrupt or the checksum is wrong")
            result.size, result.sha256, result.path = body.pos, digests["sha256"], os.fspath(temp)
            if body.pos > cache.max_size:
                log.info("the image is larger than the cache ([Cache] MaxSize); it is not kept")
                return
            result.path = os.fspath(cache.commit(fd, temp, digests, body.pos))
            cache.write_index(key, UrlEntry(
                sha256=digests["sha256"], source_key=url_key(source_url), etag=opened.header("ETag"),
                last_modified=opened.header("Last-Modified"), url=None if spec.from_parameter else spec.url,
                variant=spec.variant, fetched=time.time()))
            lock.release()
            cache.evict()
        finally:
            lock.release()

    spool.start(produce, name="download")
    stack.callback(spool.cancel, client.settings.read_timeout)
    return Opening(spool=spool, result=result, size=size)
