"""import: bring the seed on an imported disk up to date with the instance it now belongs to.

The seed create wrote (seed/deliver.py) travels with the export: a NoCloud directory in the guest, or a
``cidata``/``config-2`` disk.  Its network configuration matches every NIC by MAC, and
``gnt-backup import`` gives the instance new MACs (``--net N:mac=generate``) and may change the
NIC count, IPs and networks.  Once import has written a disk completely, this step finds the seed
on it, lets seed/reseedplan.py decide what changes, and writes that: the guest filesystem is looked at
read-only and mounted read-write only when something changes, so a seed that is still right leaves
the disk as it was, byte for byte.  A seed partition on disk 0 (seed/partition.py) is read and
rewritten through a private copy, never mounted; the guest filesystem of an image the node may not
mount (sources/trust.py) is never looked into.

Ganeti runs the import of every disk of an instance at the same time, so each import looks only
at its own disk: disk 0's guest filesystem for a NoCloud directory, any disk for a seed label.
Flamingo's files in the guest (host name, keys, accounts, the first-boot unit and its instance-id) do not
depend on the NICs, so its user-data commands do not run again after an import; its host
name follows the instance through rename, which Ganeti runs after an import.

Nothing here fails the import: the disk's data is complete, and Ganeti would report a failed import
script as disks "not imported successfully" (for a local import it still creates the instance),
sending the administrator after data that is fine.  A seed that could not be updated is a warning
saying what the guest will lack and how to fix it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from instance_cloudimage.disk.guestfiles import read_guest_file, remove_guest_file, write_guest_file
from instance_cloudimage.disk.mount import mount_guest_root
from instance_cloudimage.disk.partitions import GuestLayout, Partition, find_guest_layout
from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.ganeti.variants import host_architecture, load_variant
from instance_cloudimage.runtime.errors import CloudImageError, CommandError, SeedError
from instance_cloudimage.runtime.process import run
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.content import seed_input
from instance_cloudimage.seed.deliver import nocloud_dir
from instance_cloudimage.seed.drive import (
    CIDATA,
    MTOOLS_ENV,
    check_relative,
    copy_into_fat,
    read_from_fat,
    seed_label_of,
)
from instance_cloudimage.seed.partition import edit_partition, find_partition_seed, partition_copy
from instance_cloudimage.seed.reseedplan import (
    CD_META,
    CD_NET,
    CD_TREES,
    CD_USER,
    KEPT,
    NOCLOUD_FILES,
    SeedUpdate,
    describe_update,
    keep_instance_id,
    plan_configdrive,
    plan_nocloud,
)

log = logging.getLogger(__name__)


# --- reading and writing the seed ------------------------------------------------------------------

def read_fat_seed(path: str, label: str) -> tuple[str, dict[str, bytes]]:
    """("nocloud" | "configdrive", files) of a cidata/config-2 filesystem on ``path``."""
    if label.lower() == CIDATA:
        names: tuple[str, ...] = NOCLOUD_FILES
        kind = "nocloud"
    else:
        names = tuple(f"{t}/{n}" for t in CD_TREES for n in (CD_META, CD_USER, CD_NET))
        kind = "configdrive"
    return kind, {n: data for n in names if (data := read_from_fat(path, n)) is not None}


def delete_from_fat(image: str, names: tuple[str, ...]) -> None:
    for rel in names:
        check_relative(rel)
        try:
            run(["mdel", "-i", image, f"::/{rel}"], env=MTOOLS_ENV)
        except CommandError as e:
            raise SeedError(f"cannot remove {rel} from the seed disk: {e}") from None


def read_seed_dir(root: Path) -> dict[str, bytes] | None:
    """The NoCloud seed files in the guest mounted at ``root``; None when there is no seed directory."""
    try:
        with nocloud_dir(root) as seed_dir:
            files = {n: d for n in NOCLOUD_FILES if (d := read_guest_file(seed_dir, n)) is not None}
    except SeedError as e:  # a missing directory; UnsafeImage (a planted symlink) goes up
        log.debug("no NoCloud seed directory: %s", e)
        return None
    return files if "meta-data" in files else None


def read_guest_seed(path: str, arch: str, layout: GuestLayout) -> dict[str, bytes] | None:
    """The NoCloud seed directory's files, looked at through a read-only mount (not a byte changes);
    read-write only when read-only fails (a journal to replay)."""
    for read_only in (True, False):
        with ExitStack() as stack:
            try:
                mounted = mount_guest_root(path, stack, arch=arch, layout=layout, read_only=read_only)
            except SeedError as e:
                if not read_only:
                    raise
                log.debug("cannot mount the guest read-only (%s); mounting it read-write", e)
                continue
            return read_seed_dir(mounted.path)
    return None  # not reached: the read-write attempt returns or raises


def write_guest_seed(path: str, arch: str, layout: GuestLayout, update: SeedUpdate) -> None:
    with ExitStack() as stack:
        mounted = mount_guest_root(path, stack, arch=arch, layout=layout)
        with nocloud_dir(mounted.path) as seed_dir:
            for name in update.remove:
                remove_guest_file(seed_dir, name)
            for name, data in update.write.items():
                write_guest_file(seed_dir, name, data)


# --- the import step ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FoundSeed:
    kind: str  # nocloud | configdrive
    where: str  # for messages
    files: Mapping[str, bytes]
    label: str | None = None  # a seed disk's or partition's label; None: the NoCloud directory in the guest
    layout: GuestLayout | None = None
    partition: Partition | None = None  # the seed partition of disk 0


def read_partition_seed(path: str, part: Partition) -> FoundSeed:
    with partition_copy(path, part) as image:
        kind, files = read_fat_seed(image, part.label or "")
    return FoundSeed(kind, f"the {part.label} partition {part.number}", files, label=part.label, partition=part)


def find_seed(path: str, index: int, arch: str, *, may_mount: bool = True) -> FoundSeed | None:
    """The seed of ours on disk ``index``, or None.  Only the disk itself is read; its guest
    filesystem only when ``may_mount``."""
    label = seed_label_of(path)
    if label is not None:
        kind, files = read_fat_seed(path, label)
        return FoundSeed(kind, f"the {label} filesystem", files, label=label)
    if index != 0:
        return None
    try:
        part = find_partition_seed(path)
    except SeedError as e:  # an unreadable table: no seed of ours either, as below
        log.debug("disk 0 has no seed partition to look into: %s", e)
        part = None
    if part is not None:
        return read_partition_seed(path, part)
    if not may_mount:
        log.info("disk 0: no seed partition, and the guest filesystem of an untrusted image is never looked into")
        return None
    try:
        layout = find_guest_layout(path, arch)
    except SeedError as e:
        log.debug("disk 0 has no guest filesystem to look into: %s", e)
        return None
    in_guest = read_guest_seed(path, arch, layout)
    if in_guest is None:
        return None
    return FoundSeed("nocloud", "the guest's NoCloud directory", in_guest, layout=layout)


def has_network_config(found: FoundSeed) -> bool:
    if found.kind == "nocloud":
        return "network-config" in found.files
    return any(f"{t}/{CD_NET}" in found.files for t in CD_TREES)


def write_fat_update(image: str, update: SeedUpdate) -> bool:
    delete_from_fat(image, update.remove)
    copy_into_fat(image, update.write)
    return True


def reseed_disk(genv: GanetiEnv, site: SiteConfig, index: int, path: str, *, may_mount: bool = True) -> None:
    """Re-seed disk ``index`` (at ``path``) for the instance in ``genv``.  Raises CloudImageError."""
    arch = genv.params.get("arch") or host_architecture()
    found = find_seed(path, index, arch, may_mount=may_mount)
    if found is None:
        log.info("disk %d: no seed on it (a data disk, or an image from another provider); left as imported",
                 index)
        return
    if not has_network_config(found):
        # Without one, cloud-init configures the first NIC it finds by DHCP, whatever its MAC.
        log.info("disk %d: %s has no network configuration, which new NICs could make stale; left as "
                 "imported", index, found.where)
        return
    variant = load_variant(genv.variant, site.paths)
    inp = seed_input(genv, variant, site=site)
    keep = keep_instance_id(genv.params, site)
    plan = plan_nocloud if found.kind == "nocloud" else plan_configdrive
    update = plan(found.files, inp, keep=keep)
    if update.empty:
        log.info("disk %d: %s already matches the instance's NICs and name; left as imported", index, found.where)
        return
    if found.layout is not None:
        write_guest_seed(path, arch, found.layout, update)
    elif found.partition is not None:
        edit_partition(path, found.partition, lambda image: write_fat_update(image, update))
    else:
        write_fat_update(path, update)
    log.info("disk %d: updated %s for the imported instance: %s", index, found.where, describe_update(update))
    if update.network_changed and update.id_reason == KEPT:
        log.warning("warning: disk %d: keep_instance_id is set, so the guest applies the new network configuration "
                    "only if its cloud-init re-reads it at every boot (updates: network: when: [boot])", index)


STALE = ("its seed may still name the NICs it was exported with, and the guest then comes up without "
         "network: give the NICs their old MACs (gnt-instance modify --net N:modify,mac=MAC) or fix the seed")


def reseed_imported_disk(genv: GanetiEnv, site: SiteConfig, local_path: str | None = None, *,
                         may_mount: bool = True) -> None:
    """After import wrote disk IMPORT_INDEX completely: re-seed it.  Never raises for the disk's sake.

    ``local_path``: where the data is (a URI-only disk's staging file); else IMPORT_DEVICE.
    ``may_mount``: whether the node may mount the instance's image (sources/trust.py)."""
    t = genv.transfer
    if t is None:
        return
    if not site.get("import_reseed"):
        log.info("disk %d: left as imported ([Import] Reseed = no): its seed names the NICs it was exported with",
                 t.index)
        return
    device = local_path or t.device
    if device is None:
        log.warning("warning: disk %d is only reachable through a URI, so its seed was not looked at; %s",
                    t.index, STALE)
        return
    try:
        reseed_disk(genv, site, t.index, device, may_mount=may_mount)
    except (CloudImageError, OSError, ValueError) as e:
        log.warning("warning: disk %d: the seed could not be updated for the imported instance (%s); %s",
                    t.index, e, STALE)
    except Exception as e:  # a bug must not turn a complete import into a failed one
        log.debug("re-seeding failed", exc_info=True)
        log.warning("warning: disk %d: the seed could not be updated for the imported instance (%s: %s); %s", t.index,
                    type(e).__name__, e, STALE)
