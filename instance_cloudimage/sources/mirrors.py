"""Local mirrors: the ``[Mirrors]`` section of the site configuration.

Each key is a URL prefix and its value one or more mirror prefixes (whitespace separated)::

    [Mirrors]
    https://cloud.debian.org/images/cloud/ = http://mirror.example.org/debian-cloud/

A URL starting with a prefix is first tried at each mirror in order, then at its upstream
address.  The longest matching prefix wins.  Mirrors are the administrator's, so the image
parameter's address restrictions do not apply to them; the checksum still does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from urllib.parse import unquote

from instance_cloudimage.runtime.siteconfig import SiteConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    url: str
    mirror: bool  # False for the upstream URL itself


def candidate_urls(url: str, site: SiteConfig) -> list[Candidate]:
    """The URLs to try for ``url``, mirrors first, the upstream URL last."""
    best: tuple[str, str] | None = None
    for prefix, targets in site.mirrors:
        if url.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, targets)
    out = []
    if best is not None and has_dot_segments(url[len(best[0]):]):
        # Security: the image parameter can match a prefix too, and mirrors are fetched without the
        # address policy; '..' (resolved by urllib3 and by web servers, also %-encoded) would reach
        # any path of the mirror host.
        log.info("the image URL has '.' or '..' path segments; it is not fetched from a mirror")
        best = None
    if best is not None:
        prefix, targets = best
        for target in targets.split():
            out.append(Candidate(target + url[len(prefix):], mirror=True))
    out.append(Candidate(url, mirror=False))
    return out


def has_dot_segments(path: str) -> bool:
    """Whether ``path`` (up to its query) has a '.' or '..' segment, also %-encoded or with backslashes."""
    decoded = unquote(re.split(r"[?#]", path, maxsplit=1)[0])
    return any(seg in (".", "..") for seg in re.split(r"[/\\]", decoded))
