"""Local mirrors: the ``[Mirrors]`` section of the site configuration.

Each key is a URL prefix and its value one or more mirror prefixes (whitespace separated)::

    [Mirrors]
    https://cloud.debian.org/images/cloud/ = http://mirror.example.org/debian-cloud/

A URL matches a prefix when scheme, host and port are the same (default ports filled in, host
case and a trailing dot aside), its user info is the same, and its path continues the prefix's
path at a ``/``: ``https://h/debian`` matches ``https://h/debian`` and ``https://h/debian/x``,
never ``https://h/debian-evil/x``, ``https://h:8443/debian/x`` or ``https://h.evil.net/debian``.
A matching URL is first tried at each mirror in order, then at its upstream address.  The
longest matching prefix wins.  A mirror candidate always stays on its mirror's origin; for a URL
from the image parameter that origin alone is exempt from the address policy (docs/images.md,
"Mirrors").
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from instance_cloudimage.runtime.errors import ConfigError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.sources.urlpolicy import Origin, origin_of, redact_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    url: str
    mirror: bool  # False for the upstream URL itself
    base: str = ""  # the configured mirror prefix, for a mirror (safe to print)

    @property
    def origin(self) -> Origin | None:
        """The configured mirror's origin, for a mirror."""
        return origin_of(self.base) if self.mirror else None


@dataclass(frozen=True)
class Prefix:
    """One parsed ``[Mirrors]`` key."""

    origin: Origin
    userinfo: tuple[str | None, str | None]
    path: str

    @classmethod
    def parse(cls, text: str, where: str) -> Prefix:
        """Raises ConfigError for a key that is not a plain http(s) URL prefix."""
        origin = origin_of(text)
        parts = urlsplit(text)
        if origin is None or parts.query or parts.fragment or "?" in text or "#" in text:
            raise ConfigError(f"[Mirrors] {where} {redact_url(text)} is not an http(s) URL prefix with a host "
                              "(and without a query)")
        return cls(origin, (parts.username, parts.password), parts.path)

    def rest(self, url: str, parts: SplitResult) -> str | None:
        """What follows the prefix in ``url``, or None when ``url`` does not match."""
        if origin_of(url) != self.origin or (parts.username, parts.password) != self.userinfo:
            return None
        path = parts.path or "/"
        boundary = self.path if self.path.endswith("/") else self.path + "/"
        if path != self.path and not path.startswith(boundary):
            return None
        return path[len(self.path):] + (f"?{parts.query}" if parts.query else "")


def matching_prefix(url: str, site: SiteConfig) -> tuple[Prefix, str, str] | None:
    """The longest ``[Mirrors]`` prefix that ``url`` matches: (prefix, rest of the URL, targets)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    best: tuple[Prefix, str, str] | None = None
    for key, targets in site.mirrors:
        prefix = Prefix.parse(key, "prefix")
        rest = prefix.rest(url, parts)
        if rest is not None and (best is None or len(prefix.path) > len(best[0].path)):
            best = (prefix, rest, targets)
    return best


def mirror_url(target: str, prefix: Prefix, rest: str) -> str | None:
    """``rest`` appended to the mirror prefix ``target``; None unless the result stays on its origin."""
    if rest and prefix.path.endswith("/") and not target.endswith("/") and not rest.startswith("?"):
        rest = "/" + rest
    url = target + rest
    if origin_of(url) != origin_of(target) or urlsplit(url).netloc != urlsplit(target).netloc:
        return None
    return url


def candidate_urls(url: str, site: SiteConfig) -> list[Candidate]:
    """The URLs to try for ``url``, mirrors first, the upstream URL last."""
    best = matching_prefix(url, site)
    if best is not None and has_dot_segments(best[1]):
        # Security: the image parameter can match a prefix too, and a mirror's origin is exempt from
        # the address policy; '..' (resolved by urllib3 and by web servers, also %-encoded) would
        # reach any path of the mirror host.
        log.info("the image URL has '.' or '..' path segments; it is not fetched from a mirror")
        best = None
    out = []
    if best is not None:
        prefix, rest, targets = best
        for target in targets.split():
            Prefix.parse(target, "mirror")
            cand = mirror_url(target, prefix, rest)
            if cand is None:
                log.info("the image URL would leave mirror %s; that mirror is skipped", redact_url(target))
                continue
            out.append(Candidate(cand, mirror=True, base=target))
    out.append(Candidate(url, mirror=False))
    return out


def has_dot_segments(path: str) -> bool:
    """Whether ``path`` (up to its query) has a '.' or '..' segment, also %-encoded or with backslashes."""
    decoded = unquote(re.split(r"[?#]", path, maxsplit=1)[0])
    return any(seg in (".", "..") for seg in re.split(r"[/\\]", decoded))
