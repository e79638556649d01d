"""verify: what Ganeti runs on add, modify and reinstall, before anything is written."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.ganeti.variants import check_offered, load_variant
from instance_cloudimage.params.table import validate_parameters
from instance_cloudimage.runtime.errors import ParameterError, UserError
from instance_cloudimage.runtime.siteconfig import Paths, load_site_config

log = logging.getLogger(__name__)


def run_verify(genv: GanetiEnv, paths: Paths, argv: Sequence[str]) -> None:
    if argv and argv[0] != "parameters":
        raise ParameterError(f"verify: unknown check '{argv[0]}' (Ganeti passes 'parameters')")
    site = load_site_config(paths)
    problems = validate_parameters(genv.params, site)
    try:
        variant = load_variant(genv.variant, paths)  # an unknown name is unknown before it is not offered
        check_offered(genv.variant, paths)
    except UserError as e:
        problems.append(str(e))
    else:
        if not problems:
            from instance_cloudimage.seed.content import check_variant_parameters

            problems.extend(check_variant_parameters(genv.params, variant))
        arch = genv.params.get("arch")
        if not problems and arch and not genv.params.get("image"):
            try:
                variant.image_for(arch)
            except UserError as e:
                problems.append(str(e))
    if problems:
        for p in problems[:-1]:
            log.error("%s", p)
        raise ParameterError(problems[-1])
