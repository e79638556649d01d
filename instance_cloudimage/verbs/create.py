"""The create pipeline: variant → hooks → source → detect → convert → hooks, in that order.

Reads like a phase list on purpose; each phase lives in its own module.  Everything that must
be undone (temp files, loop devices, mounts) is registered on one ExitStack.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from instance_cloudimage.disk.deploy import deploy_image
from instance_cloudimage.disk.grow import grow_root
from instance_cloudimage.disk.mount import mount_guest_root
from instance_cloudimage.disk.staging import StagedDisks, staging_errors
from instance_cloudimage.disk.write import open_disk
from instance_cloudimage.ganeti.env import Disk, GanetiEnv, Instance
from instance_cloudimage.ganeti.uri import check_uri
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.hooks.facts import HookFacts
from instance_cloudimage.hooks.run import HookPlan, Phase, plan_hooks, run_hooks
from instance_cloudimage.image.formats import DetectedImage
from instance_cloudimage.image.qemuinfo import RECORD_DIR as QEMU_INFO_DIR
from instance_cloudimage.params.request import check_request, request_architecture
from instance_cloudimage.params.table import grow_requested
from instance_cloudimage.runtime.errors import EnvironmentError_, ParameterError, UserError
from instance_cloudimage.runtime.log import complete_step, format_size
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.values import guest_mount_reason, unseeded_reason
from instance_cloudimage.sources.fetch import ImageRef, open_image, resolve_image
from instance_cloudimage.sources.trust import ImageTrust, decide_trust, trust_of_parameters

# seeddata and seed are imported where used: they bring PyYAML, which a create without a seed
# never needs.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CreateContext:
    genv: GanetiEnv
    site: SiteConfig
    instance: Instance
    variant: Variant
    arch: str
    disk: Disk  # once staged (run_create), a URI-only disk 0 has its staging file as path
    staged: StagedDisks | None = None

    @property
    def wiped(self) -> bool:
        """The disk reads back zeros: the site says Ganeti wipes new disks, and this is no reinstall."""
        return bool(self.site.get("disks_wiped")) and not self.instance.reinstall


def prepare(genv: GanetiEnv, site: SiteConfig) -> CreateContext:
    """Validate everything that can be validated before touching the network or a disk."""
    instance = genv.require_instance()
    variant, problems = check_request(genv.params, genv.variant, site)  # exactly what verify checks
    if problems:
        raise ParameterError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    assert variant is not None  # a variant that cannot be loaded is a problem
    arch = request_architecture(genv.params)
    if not instance.disks:
        raise EnvironmentError_("the instance has no disks; $DISK_COUNT must be at least 1")
    disk = instance.disks[0]
    if disk.path is None and disk.uri is not None:
        check_uri(disk.uri, "DISK_0_URI")  # before anything is downloaded
    if disk.access != "rw":
        raise EnvironmentError_("disk 0 is read-only; the image cannot be written onto it")
    if unseeded_reason(genv.params, variant) is None:
        # The seed's inputs (host name, keys, user-data against the variant) fail here, before
        # a download or a write, rather than after the image is on the disk.  Imported here, like
        # seed.deliver below: they bring PyYAML, which a create without a seed never needs.
        from instance_cloudimage.seed.content import seed_input

        seed_input(genv, variant, site=site)
    return CreateContext(genv, site, instance, variant, arch, disk)


def write_image(ctx: CreateContext, ref: ImageRef, stack: ExitStack,
                before_write: Callable[[DetectedImage, Path | None], None] | None = None) -> DetectedImage:
    """Open the disk, then stream or convert the image onto it (disk/deploy.py).

    ``before_write`` runs once the image is detected and vetted, before the disk is touched.
    """
    target = open_disk(ctx.disk.path or "", wiped=ctx.wiped, stack=stack)
    with complete_step(f"fetching {ref.describe()}"):
        stream = open_image(ref, ctx.site, stack)
    with complete_step("writing the image"):
        done = deploy_image(stream, ref.declared_format, target, ctx.site.paths.cache_dir / "tmp", stack,
                            kept=ctx.site.paths.cache_dir / QEMU_INFO_DIR,
                            before_write=before_write)
    written = "" if done.written is None else f", {format_size(done.written)} written"
    log.info("wrote a %s image of %s onto %s%s", done.detected.details, format_size(done.detected.virtual_size),
             ctx.disk.describe(), written)
    return done.detected


def mount_guest_for_hooks(ctx: CreateContext, facts: HookFacts, stack: ExitStack, trust: ImageTrust) -> HookFacts:
    """Mount the guest's root filesystem read-write for the post-write hooks (TARGET).

    Without a mountable root (no Linux root in the image), and for an image the node may not
    mount, the hooks still run, with TARGET unset and a warning.
    """
    if not trust.may_mount:
        log.warning("post-write hooks run without the guest filesystem (TARGET is unset): the image is untrusted "
                    "and this node never mounts it ([Images] MountUntrusted)")
        return facts
    try:
        root = mount_guest_root(ctx.disk.path or "", stack, arch=ctx.arch)
    except UserError as e:
        log.warning("post-write hooks run without the guest filesystem (TARGET is unset): %s", e)
        return facts
    return dataclasses.replace(facts, target=Path(root.path), root_partition=root.device)


def check_privileges(ctx: CreateContext, plan: HookPlan) -> None:
    """Refuse, before any download or write, a create that cannot work without root.

    Writing the image onto a file disk needs only write access to it and to the cache, so an
    unprivileged local create works when nothing mounts the guest.  Reaching the guest's
    filesystem does: losetup and mount(2) are root's.  Raises EnvironmentError_.
    """
    if os.geteuid() == 0:
        return
    # An untrusted image is never mounted: its seed goes into a partition or onto disk 1, which
    # needs no root, it is not grown here, and post-write hooks get no TARGET.
    mounts = trust_of_parameters(ctx.genv.params, ctx.site).may_mount
    why = guest_mount_reason(ctx.genv.params, ctx.variant) if mounts else None
    reasons = [why] if why else []
    if mounts and grow_requested(ctx.genv.params, ctx.variant):
        reasons.append("grow_root grows the root filesystem")
    if mounts and plan.for_phase(Phase.POST_WRITE):
        reasons.append("the post-write hooks get the guest's filesystem mounted")
    if reasons:
        raise EnvironmentError_(f"not running as root, and this create mounts the guest's filesystem "
                                f"(loop devices and mount need root): {'; '.join(reasons)}",
                                "run it as root" + (", or set seed=none" if why else ""))
    cache = ctx.site.paths.cache_dir
    existing = next(d for d in (cache, *cache.parents) if d.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentError_(f"not running as root, and the image cache {cache} is not writable by this user",
                                "use a cache directory of your own with --cache-dir, or run it as root")


def run_create(genv: GanetiEnv, site: SiteConfig, *, plan: HookPlan | None = None) -> None:
    """The whole create script.  Raises a UserError subclass on any refused input."""
    ctx = prepare(genv, site)
    if plan is None:
        plan = plan_hooks(site.paths, ctx.variant.name)  # refused hooks fail before any work
    check_privileges(ctx, plan)
    ref = resolve_image(ctx.variant, genv.params, ctx.arch)
    facts = HookFacts(genv, ctx.instance, ctx.variant, ctx.arch, ctx.disk, site.paths.config_dir, ref)
    log.info("installing %s (variant %s, %s) onto %s", ctx.instance.name, ctx.variant.name, ctx.arch,
             ctx.disk.describe())
    with ExitStack() as stack:
        ctx = stage_disk(ctx, stack)
        with staging_errors(site, active=ctx.staged is not None and bool(ctx.staged.staged)):
            facts = run_phases(ctx, plan, dataclasses.replace(facts, disk=ctx.disk), stack)
        # A staged disk 0 is on its URI by now: the post hooks see the disk as Ganeti gave it.
        run_hooks(plan, Phase.POST, dataclasses.replace(facts, disk=ctx.instance.disks[0]), site)
    log.info("instance %s installed", ctx.instance.name)


def stage_disk(ctx: CreateContext, stack: ExitStack) -> CreateContext:
    """Give a URI-only disk 0 a local staging file (disk/staging.py); the steps after it see a file disk."""
    staged = StagedDisks(ctx.site, stack, target_is_zero=ctx.wiped)
    return dataclasses.replace(ctx, disk=staged.local(ctx.disk, copy_in=False), staged=staged)


def run_phases(ctx: CreateContext, plan: HookPlan, facts: HookFacts, stack: ExitStack) -> HookFacts:
    """Everything before the post hooks; returns the hooks' facts as they ended up."""
    site = ctx.site
    ref = run_hooks(plan, Phase.PRE_FETCH, facts, site)
    facts = dataclasses.replace(facts, image=ref)
    trust = decide_trust(ref.location if ref.from_parameter else None, site)
    log.info("image trust: %s", trust.describe())

    def pre_write(detected: DetectedImage, image_path: Path | None) -> None:
        nonlocal facts
        facts = dataclasses.replace(facts, image_path=image_path, image_format=detected.format.value,
                                    image_virtual_size=detected.virtual_size)
        run_hooks(plan, Phase.PRE_WRITE, facts, site)

    write_image(ctx, ref, stack, before_write=pre_write)
    if grow_requested(ctx.genv.params, ctx.variant):
        if not trust.may_mount:
            log.info("the root filesystem is not grown on this node (untrusted image); "
                     "cloud-init grows it at first boot")
        else:
            with complete_step("growing the root filesystem to the end of the disk"):
                grow_root(ctx.disk.path or "", ctx.arch, stack)
    with complete_step("seeding the guest agent"):
        unseeded = unseeded_reason(ctx.genv.params, ctx.variant)
        if unseeded is not None:
            log.info("seed delivery: none (%s)", unseeded)
        else:
            from instance_cloudimage.seed.deliver import deliver_seed

            # A URI-only seed disk is copied into a staging file when the seed needs it.
            local = functools.partial(ctx.staged.local, copy_in=True) if ctx.staged is not None else None
            # deliver_seed mounts and unmounts the guest itself, if it needs to.
            deliver_seed(ctx.genv, ctx.variant, ctx.disk.path or "", ctx.arch, stack, local, site,
                         may_mount=trust.may_mount)
    # Its own stack, so that the guest is unmounted before the post hooks run.
    with ExitStack() as guest:
        if plan.for_phase(Phase.POST_WRITE):
            run_hooks(plan, Phase.POST_WRITE, mount_guest_for_hooks(ctx, facts, guest, trust), site)
    if ctx.staged is not None:
        ctx.staged.write_back()
    return facts
