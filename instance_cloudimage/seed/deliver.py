"""Delivering the guest agent's seed onto the instance: the pipeline step after the image is written.

What the seed says is built by seed/content.py and seed/configdrive.py (pure functions); this module
decides where it goes:

- ``nocloud-fs``: ``/var/lib/cloud/seed/nocloud/`` inside the guest's root (or /var) filesystem;
- ``nocloud-disk``: a vfat ``cidata`` filesystem on disk 1, the guest's filesystem untouched;
- ``configdrive-disk``: a vfat ``config-2`` drive on disk 1 with ``latest`` and ``2012-08-10``;
- ``nocloud-partition`` / ``configdrive-partition``: the same filesystem, labelled ``CIDATA`` or
  ``config-2``, in a small partition added at the end of disk 0 (disk/seedpart.py), built in
  userspace: what an untrusted image gets, since its filesystems are never mounted;
- ``none``.

The ``seed`` OS parameter chooses, else the variant's ``Seed``, else ``auto``: cloud-init gets
``nocloud-fs`` (``nocloud-disk`` when the image has no Linux filesystem we can mount and disk 1 is
free), flamingo gets ``configdrive-disk`` plus what it would apply written into the guest (see
seed/flamingo.py for why), an agent ``none`` gets nothing.  For an image the node may not mount
(sources/trust.py) cloud-init gets ``nocloud-disk`` when disk 1 is free, else ``nocloud-partition``;
anything that writes into the guest filesystem is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from instance_cloudimage.disk.guestfiles import guest_dir, remove_guest_file, write_guest_file
from instance_cloudimage.disk.mount import mount_guest_root
from instance_cloudimage.disk.partitions import GuestLayout, find_guest_layout
from instance_cloudimage.ganeti.env import Disk, GanetiEnv, Instance
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.runtime.errors import SeedError, UnsafeImage
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.configdrive import build_configdrive
from instance_cloudimage.seed.content import build_nocloud, seed_input
from instance_cloudimage.seed.drive import CIDATA, CONFIG_2, describe_disk_content, seed_label_of, write_seed_disk
from instance_cloudimage.seed.flamingo import apply_flamingo_settings
from instance_cloudimage.seed.partition import find_partition_seed, write_seed_partition
from instance_cloudimage.seed.values import requested_delivery, unseeded_reason

log = logging.getLogger(__name__)

NOCLOUD_PARENT = "var/lib"  # exists in any image; created 0755 if not
NOCLOUD_SUBDIR = "cloud/seed/nocloud"  # ours: created 0700, root
NOCLOUD_NAMES = ("meta-data", "user-data", "network-config", "vendor-data")
PARTITION_DELIVERIES = ("nocloud-partition", "configdrive-partition")
CIDATA_PARTITION = CIDATA.upper()  # a FAT label as FAT keeps it; cloud-init looks for both spellings
FLAMINGO_HINT = ("use a cloud-init variant for this image, or have the site trust the image ([Images] "
                 "TrustedDirectories) or allow mounting it ([Images] MountUntrusted)")
UNTRUSTED_HINT = ("seed=auto puts the seed into a partition at the end of disk 0 or onto disk 1; or the site "
                  "trusts the image ([Images] TrustedDirectories) or allows mounting it ([Images] MountUntrusted)")
# Gives a URI-only disk a local path (staging.StagedDisks.local); called only for a disk the seed may use.
LocalDisk = Callable[[Disk], Disk]


@contextmanager
def nocloud_dir(root: str | os.PathLike[str], *, create: bool = False) -> Iterator[int]:
    """The NoCloud seed directory of the guest mounted at ``root``, as a directory fd, reached
    without following a guest symlink; ``create`` makes what is missing (var/lib 0755, ours 0700).
    Raises SeedError when it is missing, UnsafeImage for a planted symlink."""
    with guest_dir(root, NOCLOUD_PARENT, create=create, mode=0o755) as parent, \
            guest_dir(parent, NOCLOUD_SUBDIR, create=create, mode=0o700, shown_below=NOCLOUD_PARENT) as seed_dir:
        yield seed_dir


@dataclass(frozen=True)
class SeedPlan:
    delivery: str  # nocloud-fs | nocloud-disk | configdrive-disk | nocloud-partition | configdrive-partition | none
    seed_disk: Disk | None = None
    flamingo: bool = False  # also apply hostname, keys and user-data in the guest (seed/flamingo.py)
    reason: str = ""
    layout: GuestLayout | None = None  # nocloud-fs chosen by probing the guest: what was found


def _second_disk(instance: Instance) -> Disk | None:
    return instance.disks[1] if len(instance.disks) > 1 else None


def check_seed_disk(disk: Disk | None, delivery: str, *, explicit: bool, reinstall: bool,
                    local: LocalDisk | None = None) -> Disk:
    """The disk the seed may overwrite, or SeedError saying why not.

    Security/data safety: a disk that already holds data is only overwritten on a first install
    when the seed was asked for explicitly; on reinstall (the disk may hold the user's data) and
    for an automatic choice, only a blank disk or an earlier seed is used.
    """
    if disk is None:
        raise SeedError(f"seed={delivery} needs a second disk for the seed, and the instance has only one",
                        "add a small disk (e.g. --disk 1:size=64M) or choose another seed")
    if disk.path is None and local is not None and disk.access == "rw":
        disk = local(disk)
    if disk.path is None or disk.access != "rw":
        raise SeedError(f"disk {disk.index} cannot hold the seed: it must be a writable kernelspace disk")
    if seed_label_of(disk.path):
        return disk
    content = describe_disk_content(disk.path)
    if content is None:
        return disk
    if explicit and not reinstall:
        log.warning("disk %d holds %s; it is overwritten by the seed as seed=%s asks", disk.index, content,
                    delivery)
        return disk
    why = "on reinstall" if reinstall else "for an automatic seed choice"
    raise SeedError(f"disk {disk.index} holds {content}; refusing to overwrite it with the seed {why}",
                    f"wipe it first (wipefs -a) or set seed={delivery} on a first install")


def probe_layout(disk_path: str, arch: str) -> GuestLayout | SeedError:
    try:
        return find_guest_layout(disk_path, arch)
    except SeedError as e:
        return e


def check_mountable(variant: Variant, requested: str, may_mount: bool) -> None:
    """Refuse a delivery that writes into the guest filesystem of an image the node may not mount."""
    if may_mount:
        return
    if variant.agent == "flamingo":
        raise SeedError("a flamingo variant is configured inside the image's filesystem, which this node never "
                        "mounts for an untrusted image", FLAMINGO_HINT)
    if requested == "nocloud-fs":
        raise SeedError("seed=nocloud-fs writes into the image's filesystem, which this node never mounts for an "
                        "untrusted image", UNTRUSTED_HINT)


def plan_untrusted(second: Disk | None, reinstall: bool, local: LocalDisk | None) -> SeedPlan:
    """``auto`` for cloud-init on an image the node may not mount: a free disk 1, else a seed partition."""
    if second is not None:
        try:
            disk = check_seed_disk(second, "nocloud-disk", explicit=False, reinstall=reinstall, local=local)
        except SeedError as e:
            log.info("disk 1 cannot hold the seed (%s); using a seed partition on disk 0", e.message)
        else:
            return SeedPlan("nocloud-disk", disk, reason="untrusted image, disk 1 is free")
    return SeedPlan("nocloud-partition", reason="untrusted image: its filesystem is not mounted")


def plan_delivery(instance: Instance, variant: Variant, params: Mapping[str, str], disk_path: str,
                  arch: str, local: LocalDisk | None = None, *, may_mount: bool = True) -> SeedPlan:
    """Resolve ``auto`` and check that the chosen delivery can work.  Raises SeedError/ParameterError.

    ``may_mount``: whether the node may mount the image's filesystems (sources/trust.py)."""
    requested = requested_delivery(params, variant)
    if requested == "nocloud-fs" and not may_mount and not (params.get("seed") or "").strip():
        requested = "auto"  # the variant's default; only a seed=nocloud-fs parameter is refused
    flamingo = variant.agent == "flamingo"
    second = _second_disk(instance)
    reinstall = instance.reinstall
    unseeded = unseeded_reason(params, variant)
    if unseeded is not None:
        return SeedPlan("none", reason=unseeded)
    check_mountable(variant, requested, may_mount)
    if requested in ("nocloud-disk", "configdrive-disk"):
        return SeedPlan(requested, check_seed_disk(second, requested, explicit=True, reinstall=reinstall,
                                                   local=local),
                        flamingo, reason="asked for")
    if requested in (*PARTITION_DELIVERIES, "nocloud-fs"):
        return SeedPlan(requested, None, flamingo, reason="asked for")
    if not may_mount:
        return plan_untrusted(second, reinstall, local)
    # auto
    if flamingo:
        try:
            disk: Disk | None = check_seed_disk(second, "configdrive-disk", explicit=False, reinstall=reinstall,
                                                local=local)
        except SeedError as e:
            log.warning("no config drive for flamingo: %s", e.message)
            disk = None
        return SeedPlan("configdrive-disk" if disk else "none", disk, True, reason="flamingo agent")
    layout = probe_layout(disk_path, arch)
    if isinstance(layout, GuestLayout):
        return SeedPlan("nocloud-fs", reason="cloud-init agent", layout=layout)
    if second is None:
        raise SeedError(f"cannot seed cloud-init: {layout.message}",
                        "add a second disk for seed=nocloud-disk, or set seed=none")
    try:
        fallback = check_seed_disk(second, "nocloud-disk", explicit=False, reinstall=reinstall, local=local)
    except SeedError as e:
        raise SeedError(f"cannot seed cloud-init: {layout.message}; and {e.message}", e.hint) from None
    log.info("the image has no filesystem to seed (%s); using a cidata disk instead", layout.message)
    return SeedPlan("nocloud-disk", fallback, reason="no guest filesystem")


def write_nocloud_dir(root: Path, files: Mapping[str, bytes]) -> None:
    """Write the NoCloud seed under ``root``/var/lib/cloud/seed/nocloud, never following a symlink."""
    for name in files:
        if "/" in name or name not in NOCLOUD_NAMES:
            raise SeedError(f"unexpected NoCloud seed file {name!r}")
    try:
        with nocloud_dir(root, create=True) as seed_dir:
            for name in NOCLOUD_NAMES:
                if name not in files and remove_guest_file(seed_dir, name):
                    log.debug("removed the image's own %s from the seed directory", name)
            for name, data in files.items():
                write_guest_file(seed_dir, name, data)
    except UnsafeImage as e:
        raise UnsafeImage(e.message, "seed=nocloud-disk with a second disk leaves the guest filesystem alone") from None


def warn_of_the_images_own_seed(disk_path: str) -> None:
    """A seed partition of the image itself competes with ours on a disk or partition: cloud-init
    takes the first filesystem labelled cidata (or config-2) it finds.  The seed directory that
    nocloud-fs writes comes before any of them."""
    try:
        part = find_partition_seed(disk_path)
    except SeedError as e:
        log.warning("the image has a partition that looks like a seed: %s; the guest agent may read it "
                    "instead of the seed written now", e.message)
        return
    if part is not None:
        log.warning("the image has its own seed partition (partition %s, labelled %s); the guest agent may "
                    "read it instead of the seed written now: use an image without one", part.number, part.label)


def deliver_seed(genv: GanetiEnv, variant: Variant, disk_path: str, arch: str, stack: ExitStack,
                 local: LocalDisk | None = None, site: SiteConfig | None = None, *,
                 may_mount: bool = True) -> SeedPlan:
    """Write the seed for ``genv``'s instance after the image is on disk 0 (``disk_path``); return what was done.

    ``local`` gives a URI-only disk a local file (the create's staging), copied in when the seed
    needs it and back at the end.

    The guest filesystem is mounted only inside this call (a nested stack unwinds it before the
    next step mounts it again: two mounts of one ext4 through two loop devices would corrupt it).
    Raises SeedError, UnsafeImage or ParameterError.
    """
    plan = plan_delivery(genv.require_instance(), variant, genv.params, disk_path, arch, local,
                         may_mount=may_mount)
    log.info("seed delivery: %s (%s)", plan.delivery, plan.reason)
    if plan.delivery == "none" and not plan.flamingo:
        return plan
    if plan.delivery != "nocloud-fs" and may_mount:  # an untrusted image's filesystems are not probed at create
        warn_of_the_images_own_seed(disk_path)
    # One input for everything written: on reinstall each call would draw a new instance-id.
    inp = seed_input(genv, variant, site=site)
    nocloud = dict(build_nocloud(inp).files) if plan.delivery.startswith("nocloud") else {}
    configdrive = dict(build_configdrive(inp).files) if plan.delivery.startswith("configdrive") or plan.flamingo \
        else {}
    if plan.seed_disk is not None:
        if plan.delivery == "nocloud-disk":
            write_seed_disk(plan.seed_disk, CIDATA, nocloud)
        else:
            write_seed_disk(plan.seed_disk, CONFIG_2, configdrive)
    elif plan.delivery == "nocloud-partition":
        write_seed_partition(disk_path, CIDATA_PARTITION, nocloud)
    elif plan.delivery == "configdrive-partition":
        write_seed_partition(disk_path, CONFIG_2, configdrive)
    if plan.delivery == "nocloud-fs" or plan.flamingo:
        with ExitStack() as mounts:
            try:
                mounted = mount_guest_root(disk_path, mounts, arch=arch, layout=plan.layout)
            except SeedError as e:
                raise SeedError(f"cannot seed the guest filesystem: {e.message}",
                                e.hint or "seed=nocloud-disk with a second disk, or seed=none") from None
            if plan.delivery == "nocloud-fs":
                write_nocloud_dir(mounted.path, nocloud)
                log.info("wrote the NoCloud seed into %s", mounted.root.describe())
            if plan.flamingo:
                apply_flamingo_settings(mounted.path, configdrive, inp)
    return plan
