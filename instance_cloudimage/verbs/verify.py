"""verify: what Ganeti runs on add, modify and reinstall, before anything is written."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.ganeti.variants import check_offered
from instance_cloudimage.params.request import check_request
from instance_cloudimage.runtime.errors import ParameterError, UserError
from instance_cloudimage.runtime.siteconfig import Paths, load_site_config

log = logging.getLogger(__name__)


def run_verify(genv: GanetiEnv, paths: Paths, argv: Sequence[str]) -> None:
    if argv and argv[0] != "parameters":
        raise ParameterError(f"verify: unknown check '{argv[0]}' (Ganeti passes 'parameters')")
    variant, problems = check_request(genv.params, genv.variant, load_site_config(paths))
    if variant is not None:  # an unknown name is unknown before it is not offered
        try:
            check_offered(genv.variant, paths)
        except UserError as e:
            problems.append(str(e))
    if problems:
        for p in problems[:-1]:
            log.error("%s", p)
        raise ParameterError(problems[-1])
