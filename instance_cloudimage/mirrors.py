"""Local mirrors: the ``[Mirrors]`` section of the site configuration.

Each key is a URL prefix and its value one or more mirror prefixes (whitespace separated)::

    [Mirrors]
    https://cloud.debian.org/images/cloud/ = http://mirror.example.org/debian-cloud/

A URL starting with a prefix is first tried at each mirror in order, then at its upstream
address.  The longest matching prefix wins.  Mirrors are the administrator's, so the image
parameter's address restrictions do not apply to them; the checksum still does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SiteConfig


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
    if best is not None:
        prefix, targets = best
        for target in targets.split():
            out.append(Candidate(target + url[len(prefix):], mirror=True))
    out.append(Candidate(url, mirror=False))
    return out
