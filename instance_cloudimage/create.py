"""The create pipeline: variant → source → detect → convert, in that order.

Reads like a phase list on purpose; each phase lives in its own module.  Everything that must
be undone (temp files, loop devices, mounts) is registered on one ExitStack.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

from .config import SiteConfig
from .deploy import deploy_image
from .env import Disk, GanetiEnv, Instance
from .errors import EnvironmentError_, ParameterError
from .log import complete_step, format_size
from .params import validate_parameters
from .source import ImageRef, open_image, resolve_image
from .variants import Variant, host_architecture, load_variant
from .writer import open_disk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreateContext:
    genv: GanetiEnv
    site: SiteConfig
    instance: Instance
    variant: Variant
    arch: str
    disk: Disk


def check_parameters(genv: GanetiEnv, site: SiteConfig) -> None:
    problems = validate_parameters(genv.params, site)
    if problems:
        raise ParameterError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))


def prepare(genv: GanetiEnv, site: SiteConfig) -> CreateContext:
    """Validate everything that can be validated before touching the network or a disk."""
    instance = genv.require_instance()
    check_parameters(genv, site)
    variant = load_variant(genv.variant, site.paths)
    arch = genv.params.get("arch") or host_architecture()
    if not instance.disks:
        raise EnvironmentError_("the instance has no disks; $DISK_COUNT must be at least 1")
    disk = instance.disks[0]
    if disk.path is None:
        raise EnvironmentError_("disk 0 is only reachable through a URI (access=userspace); "
                                "set the disk's access to kernelspace for installation")
    if disk.access != "rw":
        raise EnvironmentError_("disk 0 is read-only; the image cannot be written onto it")
    return CreateContext(genv, site, instance, variant, arch, disk)


def write_image(ctx: CreateContext, ref: ImageRef, stack: ExitStack) -> None:
    """Open the disk, then stream or convert the image onto it (deploy.py)."""
    wiped = bool(ctx.site.get("disks_wiped")) and not ctx.instance.reinstall
    target = open_disk(ctx.disk.path or "", wiped=wiped, stack=stack)
    with complete_step(f"fetching {ref.describe()}"):
        stream = open_image(ref, ctx.site, stack)
    with complete_step("writing the image"):
        done = deploy_image(stream, ref.declared_format, target, ctx.site.paths.cache_dir / "tmp", stack)
    written = "" if done.written is None else f", {format_size(done.written)} written"
    log.info("wrote a %s image of %s onto %s%s", done.detected.details, format_size(done.detected.virtual_size),
             ctx.disk.describe(), written)


def run_create(genv: GanetiEnv, site: SiteConfig) -> None:
    """The whole create script.  Raises a UserError subclass on any refused input."""
    ctx = prepare(genv, site)
    ref = resolve_image(ctx.variant, dict(genv.params), ctx.arch)
    log.info("installing %s (variant %s, %s) onto %s", ctx.instance.name, ctx.variant.name, ctx.arch,
             ctx.disk.describe())
    with ExitStack() as stack:
        write_image(ctx, ref, stack)
    log.info("instance %s installed", ctx.instance.name)
