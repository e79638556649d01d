"""Image trust: whether the site chose the image, and so whether the node's kernel may mount it.

A crafted filesystem is a known way to attack a kernel, and whoever may add instances can name
any image through the ``image`` parameter.  So an image is **trusted** only when the site chose
it: named by a variant (shipped or the site's; a pre-fetch hook's mirror keeps that), or a local
file inside one of the site's ``[Images] TrustedDirectories``, or any image at all when the site
sets ``[Images] TrustImageParameter``.  Everything else the ``image`` parameter names is
untrusted, and its filesystems are never mounted on the node unless the site opts in with
``[Images] MountUntrusted`` (docs/images.md, "Image trust").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from instance_cloudimage.runtime.localpath import below
from instance_cloudimage.runtime.siteconfig import SiteConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageTrust:
    trusted: bool
    reason: str  # why, for the log: never the image's location (it may be private)
    mount_untrusted: bool = False  # the site's [Images] MountUntrusted

    @property
    def may_mount(self) -> bool:
        """Whether the node's kernel may mount the image's filesystems."""
        return self.trusted or self.mount_untrusted

    def describe(self) -> str:
        if self.trusted:
            return f"trusted ({self.reason})"
        if self.mount_untrusted:
            return f"untrusted ({self.reason}); mounted all the same, as [Images] MountUntrusted = yes allows"
        return f"untrusted ({self.reason}); its filesystems are never mounted on this node"


def in_trusted_directory(location: str, site: SiteConfig) -> bool:
    """Whether ``location`` (a path or file:// URL) resolves to a file inside a trusted directory."""
    try:
        parts = urlsplit(location)
    except ValueError:
        return False
    if parts.scheme.lower() not in ("", "file"):
        return False
    path = parts.path if parts.scheme else location
    if not os.path.isabs(path):
        return False
    real = os.path.realpath(path)
    return any(below(real, os.path.realpath(d)) for d in site.get("trusted_dirs"))


def decide_trust(image_parameter: str | None, site: SiteConfig) -> ImageTrust:
    """The trust of an image: ``image_parameter`` is the location the ``image`` parameter named
    (after any pre-fetch hook), None when the variant named it."""
    mount = bool(site.get("mount_untrusted"))
    if image_parameter is None:
        return ImageTrust(True, "named by the variant")
    if in_trusted_directory(image_parameter.strip(), site):
        return ImageTrust(True, "a local file in one of [Images] TrustedDirectories")
    if site.get("trust_image_parameter"):
        return ImageTrust(True, "named by the image parameter, which [Images] TrustImageParameter trusts")
    return ImageTrust(False, "named by the image parameter", mount_untrusted=mount)


def trust_of_parameters(params: Mapping[str, str], site: SiteConfig) -> ImageTrust:
    """The trust of the image an instance was created from, decided again from its parameters
    (import, rename and verify have no image in hand)."""
    image = (params.get("image") or "").strip()
    return decide_trust(image or None, site)
