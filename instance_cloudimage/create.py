"""The create pipeline: variant → hooks → source → detect → convert → hooks, in that order.

Reads like a phase list on purpose; each phase lives in its own module.  Everything that must
be undone (temp files, loop devices, mounts) is registered on one ExitStack.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .config import SiteConfig
from .convert import write_image
from .detect import DetectedImage, detect_format
from .env import Disk, GanetiEnv, Instance
from .errors import EnvironmentError_, ParameterError, UnsafeImage, UserError
from .formats import normalize_declared
from .grow import grow_requested, grow_root
from .hookenv import HookFacts
from .hooks import HookPlan, Phase, plan_hooks, run_hooks
from .log import complete_step
from .params import validate_parameters
from .seed import deliver_seed
from .source import FetchedImage, ImageRef, fetch_image, resolve_image
from .variants import Variant, host_architecture, load_variant

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


def check_declared_format(ref: ImageRef, detected: DetectedImage) -> None:
    if ref.declared_format != "auto" and normalize_declared(ref.declared_format) != detected.format:
        raise UnsafeImage(f"image was declared as {ref.declared_format} but its content is "
                          f"{detected.format.value}", "fix the variant's [Image] Format")


def open_and_detect(fetched: FetchedImage) -> DetectedImage:
    fd = os.open(fetched.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return detect_format(fd)
    finally:
        os.close(fd)


def mount_guest_for_hooks(ctx: CreateContext, facts: HookFacts, stack: ExitStack) -> HookFacts:
    """Mount the guest's root filesystem read-write for the post-write hooks (TARGET).

    Without a mountable root (no guest-filesystem support in this build, or no Linux root in
    the image) the hooks still run, with TARGET unset and a warning.
    """
    try:
        guestfs = importlib.import_module(".guestfs", __package__)
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.guestfs":
            raise
        log.warning("post-write hooks run without the guest filesystem (TARGET is unset): "
                    "this build cannot mount it")
        return facts
    try:
        root = guestfs.mount_guest_root(ctx.disk.path, stack, arch=ctx.arch)
    except UserError as e:
        log.warning("post-write hooks run without the guest filesystem (TARGET is unset): %s", e)
        return facts
    return dataclasses.replace(facts, target=Path(root.path), root_partition=getattr(root, "device", None))


def run_create(genv: GanetiEnv, site: SiteConfig, *, plan: HookPlan | None = None) -> None:
    """The whole create script.  Raises a UserError subclass on any refused input."""
    ctx = prepare(genv, site)
    if plan is None:
        plan = plan_hooks(site.paths, ctx.variant.name)  # refused hooks fail before any work
    ref = resolve_image(ctx.variant, dict(genv.params), ctx.arch)
    facts = HookFacts(genv, ctx.instance, ctx.variant, ctx.arch, ctx.disk, site.paths.config_dir, ref)
    log.info("installing %s (variant %s, %s) onto %s", ctx.instance.name, ctx.variant.name, ctx.arch,
             ctx.disk.describe())
    with ExitStack() as stack:
        ref = run_hooks(plan, Phase.PRE_FETCH, facts, site)
        facts = dataclasses.replace(facts, image=ref)
        with complete_step(f"fetching {ref.describe()}"):
            fetched = fetch_image(ref, site, stack)
        detected = open_and_detect(fetched)
        check_declared_format(ref, detected)
        log.info("image is %s, virtual size %d bytes", detected.details, detected.virtual_size)
        facts = dataclasses.replace(facts, image_path=fetched.path, image_format=detected.format.value,
                                    image_virtual_size=detected.virtual_size)
        run_hooks(plan, Phase.PRE_WRITE, facts, site)
        with complete_step("writing the image"):
            write_image(Path(fetched.path), detected, ctx.disk.path or "")
        if grow_requested(genv.params, ctx.variant):
            with complete_step("growing the root filesystem to the end of the disk"):
                grow_root(ctx.disk.path or "", ctx.arch, stack)
        with complete_step("seeding the guest agent"):
            deliver_seed(ctx, stack)  # mounts and unmounts the guest itself, if it needs to
        # Its own stack, so that the guest is unmounted before the post hooks run.
        with ExitStack() as guest:
            if plan.for_phase(Phase.POST_WRITE):
                run_hooks(plan, Phase.POST_WRITE, mount_guest_for_hooks(ctx, facts, guest), site)
        run_hooks(plan, Phase.POST, facts, site)
    log.info("instance %s installed", ctx.instance.name)
