"""HTTP(S) requests: timeouts, retries with backoff and Retry-After, manual redirects, one-line errors.

Ganeti resets the environment, so nothing is taken from it (``trust_env`` is off): the proxy,
no-proxy list and extra CA bundle come from the site configuration.  TLS is always verified.
Redirects are followed by hand so that every hop is checked by ``urlpolicy.check_url``, and a
request for a user's URL connects through a pool whose connections check the address they
actually reached (``urlpolicy.check_peer``), which defeats DNS rebinding.

Which statuses are retried and what a server's ``Retry-After`` says (seconds or an HTTP-date)
is urllib3's ``Retry``; the loop is ours, because a redirect hop needs ``check_url`` before it is
followed, a wait must be logged in Ganeti's log, and a server asking for an hour must not hold a
Ganeti job that long (MAX_RETRY_AFTER).

Bodies are not read here; ``sources/download.py`` streams them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from instance_cloudimage import __version__
from instance_cloudimage.runtime.errors import ConfigError, ImageFetchError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.sources.urlpolicy import (
    UrlPolicy,
    check_peer,
    check_resolved,
    check_url,
    make_origin,
    origin_of,
)

log = logging.getLogger(__name__)

USER_AGENT = f"instance-cloudimage/{__version__}"
REDIRECTS = (301, 302, 303, 307, 308)
RETRIED_STATUSES = (429, 500, 502, 503, 504)
MAX_BACKOFF = 60.0
MAX_RETRY_AFTER = 300.0  # docs/images.md: the longest Retry-After we wait; a longer one ends the attempts
# GET only, and the statuses above; a 413, 429 or 503 with a Retry-After header is retried too.
RETRY_POLICY = Retry(total=1, status_forcelist=RETRIED_STATUSES, respect_retry_after_header=True)


@dataclass(frozen=True)
class HttpSettings:
    connect_timeout: float
    read_timeout: float
    retries: int
    backoff: float
    max_redirects: int
    ca_bundle: str | None
    proxy: str | None
    no_proxy: tuple[str, ...]

    @classmethod
    def from_site(cls, site: SiteConfig) -> HttpSettings:
        """Raises ConfigError for a CABundle that does not exist (requests would raise a bare OSError)."""
        ca_bundle = site.get("ca_bundle")
        if ca_bundle and not os.path.exists(ca_bundle):  # a file, or a c_rehash'ed directory
            raise ConfigError(f"[HTTP] CABundle {ca_bundle} does not exist",
                              f"fix it in {site.paths.site_config}")
        return cls(
            connect_timeout=float(site.get("connect_timeout")),
            read_timeout=float(site.get("read_timeout")),
            retries=int(site.get("retries")),
            backoff=float(site.get("retry_backoff")),
            max_redirects=int(site.get("max_redirects")),
            ca_bundle=site.get("ca_bundle"),
            proxy=site.get("proxy"),
            no_proxy=tuple(re.split(r"[\s,]+", site.get("no_proxy") or "")),
        )

    def proxy_for(self, url: str) -> str | None:
        if not self.proxy:
            return None
        host = (urlsplit(url).hostname or "").lower()
        for entry in (e.strip().lower() for e in self.no_proxy):
            if not entry:
                continue
            if entry == "*" or host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")):
                return None
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return None
            except ValueError:
                pass
        return self.proxy


def guarded_adapter(policy: UrlPolicy) -> HTTPAdapter:
    """An adapter whose connections check the peer address before sending anything."""

    def checked(conn: HTTPConnection, scheme: str, sock: Any) -> Any:
        origin = make_origin(scheme, conn.host, conn.port)
        try:
            check_peer(conn.host, sock.getpeername()[0], policy, origin)
        except BaseException:
            sock.close()
            raise
        return sock

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> Any:
            return checked(self, "http", super()._new_conn())

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> Any:
            return checked(self, "https", super()._new_conn())

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}

    # Retries are ours (with backoff and logging); urllib3's would hide them.
    return GuardedAdapter(max_retries=0)


@dataclass
class Opened:
    """A response whose headers are in and whose body has not been read."""

    response: requests.Response
    url: str  # after redirects

    @property
    def status(self) -> int:
        return self.response.status_code

    def header(self, name: str) -> str | None:
        value = self.response.headers.get(name)
        return str(value) if value is not None else None

    def close(self) -> None:
        self.response.close()


class HttpClient:
    """Requests for one source URL and its redirects, under one policy."""

    def __init__(self, site: SiteConfig, policy: UrlPolicy) -> None:
        self.settings = HttpSettings.from_site(site)
        self.policy = policy
        self.session = requests.Session()
        self.session.trust_env = False  # Ganeti's environment is not ours to read
        self.session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        adapter = guarded_adapter(policy) if policy.restricted else HTTPAdapter(max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def open(self, url: str, headers: dict[str, str] | None = None, *, what: str | None = None) -> Opened:
        """GET ``url`` following redirects; return a 200, 206 or 304 response.

        ``what`` names the URL in messages (default: the policy's description).  Raises
        ImageFetchError with one line for everything else.
        """
        what = what or self.policy.describe(url)
        current = url
        for hop in range(self.settings.max_redirects + 1):
            check_url(current, self.policy, hop=hop, source=what)
            resp = self._send(current, headers or {}, what)
            if resp.status_code in REDIRECTS:
                location = resp.headers.get("Location")
                resp.close()
                if not location:
                    raise ImageFetchError(f"{what}: HTTP {resp.status_code} redirect without a Location")
                current = urljoin(current, location)
                log.debug("redirected (hop %d)", hop + 1)
                continue
            if resp.status_code in (200, 206, 304):
                return Opened(resp, current)
            resp.close()
            raise status_error(resp.status_code, resp.reason, what)
        raise ImageFetchError(f"{what} redirects more than {self.settings.max_redirects} times",
                              "raise [HTTP] MaxRedirects if this is expected")

    def _send(self, url: str, headers: dict[str, str], what: str) -> requests.Response:
        s = self.settings
        proxy = s.proxy_for(url)
        if proxy and self.policy.restricted:
            check_resolved(urlsplit(url).hostname or "", self.policy, origin_of(url))
        proxies = {"http": proxy, "https": proxy} if proxy else {}
        attempts = s.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                        timeout=(s.connect_timeout, s.read_timeout),
                                        verify=s.ca_bundle or True, proxies=proxies)
            except requests.RequestException as e:
                err = exception_error(e, what, s)
                if last or not retryable(e):
                    raise err from None
                self._wait(attempt, err.message)
                continue
            if not RETRY_POLICY.is_retry("GET", resp.status_code, "Retry-After" in resp.headers):
                return resp
            resp.close()
            asked = server_delay(resp)
            status = f"HTTP {resp.status_code} {resp.reason}".rstrip()
            if asked is not None and asked > MAX_RETRY_AFTER:
                raise ImageFetchError(f"{what}: {status}, and the server asks to retry after {asked:.0f}s, "
                                      f"longer than the {MAX_RETRY_AFTER:.0f}s we wait", "try again later")
            if last:
                raise ImageFetchError(f"{what}: server error {status} after {attempts} attempts")
            self._wait(attempt, f"{what}: HTTP {resp.status_code}", asked)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, reason: str, asked: float | None = None) -> None:
        """Sleep our backoff, or as long as the server asked (Retry-After) if that is longer."""
        delay = self.retry_delay(attempt)
        if asked is not None and asked > delay:
            delay = asked
            reason += " asking to retry later"
        log.warning("%s; retrying in %.0fs (attempt %d of %d)", reason, delay, attempt + 2,
                    self.settings.retries + 1)
        time.sleep(delay)

    def retry_delay(self, attempt: int) -> float:
        return float(min(self.settings.backoff * (2 ** attempt), MAX_BACKOFF))


def server_delay(resp: requests.Response) -> float | None:
    """The seconds a 429 or 503 response's Retry-After asks for (a number or an HTTP-date, read by
    urllib3); None without one, or for a value that is neither."""
    if resp.status_code not in (429, 503):
        return None
    try:
        value = RETRY_POLICY.get_retry_after(resp.raw)
    except urllib3.exceptions.InvalidHeader:
        return None
    return None if value is None else float(value)


def retryable(e: BaseException) -> bool:
    if isinstance(e, requests.exceptions.SSLError | requests.exceptions.InvalidURL |
                  requests.exceptions.InvalidSchema | requests.exceptions.MissingSchema):
        return False
    return isinstance(e, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError)


def status_error(code: int, reason: str, what: str) -> ImageFetchError:
    if code == 404 or code == 410:
        return ImageFetchError(f"{what} was not found (HTTP {code})", "check the URL or the variant's [Image] URL")
    if code in (401, 403):
        return ImageFetchError(f"access to {what} is forbidden (HTTP {code})")
    return ImageFetchError(f"{what}: unexpected HTTP {code} {reason}".rstrip())


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(out) < 10:
        out.append(cur)
        nxt = cur.__cause__ or cur.__context__
        if nxt is None and cur.args and isinstance(cur.args[0], BaseException):
            nxt = cur.args[0]
        if nxt is None and isinstance(cur, urllib3.exceptions.MaxRetryError):
            nxt = cur.reason
        cur = nxt
    return out


def exception_error(e: requests.RequestException, what: str, s: HttpSettings) -> ImageFetchError:
    """One line for a transport failure; never the URL itself unless ``what`` contains it."""
    chain = _chain(e)
    text = " ".join(str(x) for x in chain)
    if isinstance(e, requests.exceptions.SSLError):
        m = re.search(r"certificate verify failed: ([^(\)'\"]+)", text)
        reason = m.group(1).strip() if m else "the TLS handshake failed"
        return ImageFetchError(f"TLS verification failed for {what}: {reason}",
                               "an administrator can add a CA bundle with [HTTP] CABundle")
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return ImageFetchError(f"timed out connecting to {what} after {s.connect_timeout:.0f}s")
    if isinstance(e, requests.exceptions.ReadTimeout):
        return ImageFetchError(f"{what} sent no data for {s.read_timeout:.0f}s")
    if isinstance(e, requests.exceptions.ProxyError):
        return ImageFetchError(f"the proxy failed for {what}", "check [HTTP] Proxy in the site configuration")
    if any(isinstance(x, urllib3.exceptions.NameResolutionError) for x in chain) or \
            re.search(r"Name or service not known|Temporary failure in name resolution|No address associated",
                      text):
        return ImageFetchError(f"cannot resolve the host name of {what}")
    if "Connection refused" in text:
        return ImageFetchError(f"connection to {what} was refused")
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return ImageFetchError(f"the connection to {what} broke off during the transfer")
    return ImageFetchError(f"cannot connect to {what}")
