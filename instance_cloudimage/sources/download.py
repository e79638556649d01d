"""Streaming a body into a spool file while a consumer reads it: the tee behind ImageStream.

One producer thread writes the bytes into the spool file (which becomes the cache entry) and
hashes them in-process as they arrive; the consumer (the disk writer) reads the same file
behind it with ``pread``, so the download overlaps decompression and disk writes.  The consumer
sees end-of-file only after the producer has verified the whole body: a writer that finishes
normally has consumed checked bytes.

An interrupted body is resumed with ``Range`` + ``If-Range`` (strong ETag or Last-Modified);
only a 206 whose ``Content-Range`` starts where we stopped is appended.  A 200 instead (the
server ignores ranges, or the file changed) restarts the hash from zero and compares the bytes
already spooled with the new ones: identical bytes continue the download, different bytes are an
error, since the consumer has already seen the old ones.
"""

from __future__ import annotations

import logging
import os
import re
import time

import requests
import urllib3

from instance_cloudimage.runtime.errors import ImageFetchError, ImageTooLarge
from instance_cloudimage.runtime.log import Progress
from instance_cloudimage.sources.http import HttpClient, Opened
from instance_cloudimage.sources.spool import CHUNK, Cancelled, Hasher, Spool

__all__ = ["CHUNK", "BodyDownload", "Cancelled", "Hasher", "Spool", "validator_of"]

log = logging.getLogger(__name__)

CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class BodyDownload:
    """Transfer one response body into a spool, resuming and restarting as needed."""

    def __init__(self, client: HttpClient, url: str, first: Opened, spool: Spool, hasher: Hasher,
                 *, max_size: int, what: str) -> None:
        self.client = client
        self.url = url  # the URL to ask again (redirects are followed again and re-checked)
        self.response: Opened | None = first
        self.spool = spool
        self.hasher = hasher
        self.max_size = max_size
        self.what = what
        self.pos = 0  # bytes of the current body hashed so far
        self.filled = 0  # bytes in the spool file
        self.total = self._length(first)
        self.validator = validator_of(first)

    @staticmethod
    def _length(resp: Opened) -> int | None:
        value = resp.header("Content-Length")
        return int(value) if value and value.isdigit() else None

    def run(self) -> None:
        if self.total is not None and self.total > self.max_size:
            raise ImageTooLarge(f"{self.what} is {self.total} bytes, more than [Images] MaxDownloadSize")
        failures = 0
        with Progress("downloading image", self.total) as progress:
            while True:
                resp = self.response
                if resp is None:
                    resp = self._reopen()
                before = self.pos
                try:
                    self._stream(resp, progress)
                    if self.total is not None and self.pos < self.total:
                        # Some stacks report a short body as a plain EOF.
                        raise urllib3.exceptions.ProtocolError("the body ended early")
                    resp.close()
                    break
                except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                    resp.close()
                    self.response = None
                    failures = 0 if self.pos > before else failures + 1
                    if failures > self.client.settings.retries:
                        raise ImageFetchError(f"the download of {self.what} broke off after {self.pos} bytes "
                                              f"and could not be resumed") from None
                    delay = self.client.retry_delay(failures - 1 if failures else 0)
                    log.warning("the download broke off after %d bytes (%s); resuming in %.0fs",
                                self.pos, type(e).__name__, delay)
                    time.sleep(delay)
        if self.total is not None and self.pos != self.total:
            raise ImageFetchError(f"{self.what} ended after {self.pos} of {self.total} bytes")

    def _stream(self, resp: Opened, progress: Progress) -> None:
        for chunk in resp.response.raw.stream(CHUNK, decode_content=False):
            if self.spool.cancelled:
                raise Cancelled()
            n = len(chunk)
            end = self.pos + n
            if end > self.max_size:
                raise ImageTooLarge(f"{self.what} is larger than [Images] MaxDownloadSize")
            overlap = max(0, min(self.filled, end) - self.pos)
            if overlap:
                # Restarted body: what we already spooled (and the consumer read) must not change.
                if os.pread(self.spool.fd, overlap, self.pos) != chunk[:overlap]:
                    raise ImageFetchError(f"{self.what} changed on the server during the download",
                                          "try again")
            if overlap < n:
                os.pwrite(self.spool.fd, memoryview(chunk)[overlap:], self.pos + overlap)
            self.hasher.update(chunk)
            self.pos = end
            if end > self.filled:
                progress.update(end - self.filled)
                self.filled = end
                self.spool.advance(end)

    def _reopen(self) -> Opened:
        headers: dict[str, str] = {}
        if self.pos and self.validator:
            headers = {"Range": f"bytes={self.pos}-", "If-Range": self.validator}
        resp = self.client.open(self.url, headers, what=self.what)
        if resp.status == 206:
            m = CONTENT_RANGE_RE.match(resp.header("Content-Range") or "")
            if not m or int(m.group(1)) != self.pos or \
                    (self.total is not None and m.group(3) != "*" and int(m.group(3)) != self.total):
                resp.close()
                raise ImageFetchError(f"{self.what}: the server answered the resume with a wrong range")
            log.info("resuming the download at byte %d", self.pos)
            return resp
        if resp.status != 200:
            resp.close()
            raise ImageFetchError(f"{self.what}: unexpected HTTP {resp.status} when resuming")
        total = self._length(resp)
        if self.total is not None and total is not None and total != self.total:
            resp.close()
            raise ImageFetchError(f"{self.what} changed on the server during the download", "try again")
        log.info("the server does not resume downloads; starting again from the beginning")
        self.total = total if total is not None else self.total
        self.validator = validator_of(resp) or self.validator
        self.hasher.reset()
        self.pos = 0
        return resp


def validator_of(resp: Opened) -> str | None:
    """A validator usable with If-Range: a strong ETag, else Last-Modified."""
    etag = resp.header("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.header("Last-Modified")
