"""What an untrusted image cannot be asked for: the choices that need its filesystem mounted.

verify and create refuse them with one line each, before anything is fetched (docs/images.md,
"Image trust"): a flamingo variant (configured inside the guest filesystem), ``seed=nocloud-fs``
and ``grow_root=yes`` given as parameters.  A variant's own ``GrowRoot = yes`` or ``Seed =
nocloud-fs`` is not refused: create leaves the growth to cloud-init at first boot and seeds as
``auto`` does for an untrusted image.
"""

from __future__ import annotations

from collections.abc import Mapping

from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.runtime.settings import parse_bool
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.values import unseeded_reason
from instance_cloudimage.sources.trust import trust_of_parameters

SITE_HINT = ("or have the site trust the image ([Images] TrustedDirectories) or allow mounting it "
             "([Images] MountUntrusted)")


def untrusted_problems(params: Mapping[str, str], variant: Variant, site: SiteConfig) -> list[str]:
    """One message per choice that needs the node to mount an image it may not mount."""
    if trust_of_parameters(params, site).may_mount:
        return []
    problems = []
    if variant.agent == "flamingo" and unseeded_reason(params, variant) is None:
        problems.append(f"variant {variant.name} uses flamingo, which can only be configured inside the image's "
                        "filesystem, and this node never mounts an image named by the image parameter; use a "
                        f"cloud-init variant, {SITE_HINT}")
    if (params.get("seed") or "").strip() == "nocloud-fs":  # a variant's Seed = nocloud-fs becomes auto
        problems.append("seed=nocloud-fs writes into the image's filesystem, which this node never mounts for an "
                        f"image named by the image parameter; use seed=auto (a seed partition or disk 1), {SITE_HINT}")
    try:
        grow = parse_bool(params.get("grow_root") or "no")
    except ValueError:
        grow = False  # the parameter check reports it
    if grow:
        problems.append("grow_root=yes grows the image's filesystem on this node, which never mounts an image named "
                        f"by the image parameter; cloud-init grows it at first boot, {SITE_HINT}")
    return problems

