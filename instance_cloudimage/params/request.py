"""One check of a request, shared by verify and create.

Ganeti runs ``verify`` on add, modify and reinstall before anything is written, with the OS
parameters and the variant but no instance.  Everything that can be decided from those, this
node's site configuration and its architecture is decided here, so that create never refuses,
after a download, a value verify let through, and both say it in the same words.  Create then
checks only what verify cannot see: the instance's disks, NICs and name.
"""

from __future__ import annotations

from collections.abc import Mapping

from instance_cloudimage.ganeti.variants import Variant, host_architecture, load_variant
from instance_cloudimage.params.table import validate_parameters
from instance_cloudimage.params.untrusted import untrusted_problems
from instance_cloudimage.runtime.errors import UserError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.sources.urlpolicy import check_plain_http


def check_request(params: Mapping[str, str], variant_name: str, site: SiteConfig) -> tuple[Variant | None, list[str]]:
    """The variant (None when it cannot be loaded) and one message per problem, in order."""
    problems = validate_parameters(params, site)
    try:
        variant = load_variant(variant_name, site.paths)
    except UserError as e:
        return None, [*problems, str(e)]
    if problems:
        return variant, problems
    if any(params.get(name, "").strip() for name in ("password_hash", "user_data", "dns_search")):
        # Imported here: it brings PyYAML, which a request without a seed never needs.
        from instance_cloudimage.seed.content import check_variant_parameters

        problems += check_variant_parameters(params, variant)
    try:
        image = params.get("image", "").strip()
        if image:
            check_plain_http(image, bool(params.get("image_checksum", "").strip()), site)
        else:
            variant.image_for(request_architecture(params))
    except UserError as e:
        problems.append(str(e))
    return variant, problems + untrusted_problems(params, variant, site)


def request_architecture(params: Mapping[str, str]) -> str:
    """The ``arch`` parameter, else this node's (verify runs on each of the instance's nodes)."""
    return params.get("arch") or host_architecture()
