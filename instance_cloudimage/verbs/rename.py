"""rename: put the new name into the instance's seeds (seed/rename.py) (docs/lifecycle.md, "Rename").

A rename never fails the job for a cosmetic reason, and one that keeps the name touches nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.runtime.errors import CommandError, UserError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.rename import rename_seeds
from instance_cloudimage.sources.trust import trust_of_parameters

log = logging.getLogger(__name__)


RenameStep = Callable[[GanetiEnv, SiteConfig], None]


def rename_seed(genv: GanetiEnv, site: SiteConfig) -> None:
    """The seeds, without mounting the guest filesystem of an untrusted image."""
    rename_seeds(genv, site, may_mount=trust_of_parameters(genv.params, site).may_mount)


# Steps that change the disk for a new name.
RENAME_STEPS: Sequence[tuple[str, RenameStep]] = (
    ("put the new name into the seed", rename_seed),
)


def run_rename(genv: GanetiEnv, site: SiteConfig, steps: Sequence[tuple[str, RenameStep]] | None = None) -> None:
    """The rename script: each step is best effort, a failure only a warning.

    Ganeti itself treats a failed rename as a warning, but the job log then reads like an error;
    nothing a rename changes (hostname files) is worth that, so even a bug is only logged.
    """
    instance = genv.require_instance()
    if genv.old_instance_name == instance.name:
        # Ganeti runs rename after every import, with the same name: the disk stays exactly as the
        # import left it (no mount, no seed rewritten, the instance-id kept), at the cost of nothing.
        log.info("the name %s did not change; no disk was looked at or written", instance.name)
        return
    for what, step in RENAME_STEPS if steps is None else steps:
        try:
            step(genv, site)
        except (UserError, CommandError) as e:
            log.warning("rename: could not %s (left unchanged): %s", what, e)
        except Exception as e:
            log.debug("rename step failed", exc_info=True)
            log.warning("rename: could not %s (left unchanged): %s: %s", what, type(e).__name__, e)
    log.info("renamed %s to %s", genv.old_instance_name, instance.name)
