"""rename: put the instance's new name into the seeds it already has.

The seed is edited in place, never rebuilt: secret parameters (a password hash, user-data) are not
available to rename, and a new instance-id would make cloud-init redo its first boot.  Only the
values equal to the old name change: ``local-hostname``/``hostname`` in meta-data, ``hostname``/
``name`` in meta_data.json, top-level ``hostname:``/``fqdn:`` in cloud-config user-data (plain or
inside MIME parts), and a guest ``/etc/hostname`` holding exactly the old name (flamingo images).
Nothing here fails the job: Ganeti treats a failed rename as a warning anyway, and a hostname is
cosmetic next to the instance's data.  A seed partition on disk 0 is edited through a private copy
(seed/partition.py); the guest filesystem of an image the node may not mount is left alone.
"""

from __future__ import annotations

import email.encoders
import json
import logging
import re
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

import yaml

from instance_cloudimage.disk.guestfiles import guest_dir, read_guest_file, write_guest_file
from instance_cloudimage.disk.mount import mount_guest_root
from instance_cloudimage.disk.partitions import GuestLayout, Partition, find_guest_layout
from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.ganeti.variants import host_architecture
from instance_cloudimage.runtime.errors import CloudImageError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.deliver import NOCLOUD_NAMES, nocloud_dir
from instance_cloudimage.seed.drive import copy_into_fat, read_from_fat, seed_label_of
from instance_cloudimage.seed.partition import edit_partition, find_partition_seed
from instance_cloudimage.seed.userdata import cloud_config_parts, load_guest_mapping

log = logging.getLogger(__name__)

Renamer = Callable[[str], str | None]
CONFIGDRIVE_META = ("openstack/latest/meta_data.json", "openstack/2012-08-10/meta_data.json")
CONFIGDRIVE_USER = ("openstack/latest/user_data", "openstack/2012-08-10/user_data")
TOP_LEVEL_NAME_RE = re.compile(rb"^(?P<key>hostname|fqdn)(?P<sep>:[ \t]*)(?P<q>['\"]?)(?P<value>[A-Za-z0-9.-]+)(?P=q)"
                               rb"(?P<tail>[ \t]*(#.*)?)$", re.MULTILINE)


def make_renamer(old: str, new: str) -> Renamer:
    """Map the old name (FQDN or its first label) to the new one; None for any other value."""
    old_short, new_short = old.split(".")[0], new.split(".")[0]

    def rename(value: str) -> str | None:
        if value == old:
            return new
        if value == old_short:
            return new_short
        return None
    return rename


def rename_metadata_yaml(data: bytes, rename: Renamer) -> bytes | None:
    md = load_guest_mapping(data)
    if md is None:
        return None
    changed = False
    for key in ("local-hostname", "hostname"):
        value = md.get(key)
        if isinstance(value, str) and (renamed := rename(value)) is not None:
            md[key], changed = renamed, True
    return yaml.safe_dump(md, default_flow_style=False, sort_keys=False).encode() if changed else None


def rename_metadata_json(data: bytes, rename: Renamer) -> bytes | None:
    try:
        md = json.loads(data)
    except ValueError:
        return None
    if not isinstance(md, dict):
        return None
    changed = False
    for key in ("hostname", "name"):
        value = md.get(key)
        if isinstance(value, str) and (renamed := rename(value)) is not None:
            md[key], changed = renamed, True
    return (json.dumps(md, indent=2) + "\n").encode() if changed else None


def rename_cloud_config(text: bytes, rename: Renamer) -> bytes | None:
    """Rewrite top-level ``hostname:``/``fqdn:`` lines holding the old name; the rest stays byte for byte."""
    changed = False

    def sub(m: re.Match[bytes]) -> bytes:
        nonlocal changed
        renamed = rename(m.group("value").decode())
        if renamed is None:
            return m.group(0)
        changed = True
        return m.group("key") + m.group("sep") + m.group("q") + renamed.encode() + m.group("q") + m.group("tail")

    out = TOP_LEVEL_NAME_RE.sub(sub, text)
    return out if changed else None


def rename_user_data(data: bytes, rename: Renamer) -> bytes | None:
    """Rename inside cloud-config user-data, plain or as text/cloud-config parts of a MIME multipart."""
    msg, parts = cloud_config_parts(data)
    if msg is None:
        return rename_cloud_config(data, rename) if parts else None
    changed = False
    for part, payload in parts:
        if part is None or (new := rename_cloud_config(payload, rename)) is None:
            continue
        was_base64 = (part.get("Content-Transfer-Encoding") or "").lower() == "base64"
        del part["Content-Transfer-Encoding"]
        part.set_payload(new)
        if was_base64:
            email.encoders.encode_base64(part)
        else:
            part["Content-Transfer-Encoding"] = "8bit" if any(b > 127 for b in new) else "7bit"
        changed = True
    return msg.as_bytes() if changed else None


def rename_seed_files(files: Mapping[str, bytes], rename: Renamer) -> dict[str, bytes]:
    """The seed files whose content changes, by relative path (NoCloud or config-drive names)."""
    out: dict[str, bytes] = {}
    for path, data in files.items():
        if path == "meta-data":
            new = rename_metadata_yaml(data, rename)
        elif path in CONFIGDRIVE_META:
            new = rename_metadata_json(data, rename)
        elif path == "user-data" or path in CONFIGDRIVE_USER:
            new = rename_user_data(data, rename)
        else:
            new = None
        if new is not None:
            out[path] = new
    return out


def rename_seed_disk(path: str, label: str, rename: Renamer) -> int:
    names = ("meta-data", "user-data") if label.lower() == "cidata" else CONFIGDRIVE_META + CONFIGDRIVE_USER
    files = {n: data for n in names if (data := read_from_fat(path, n)) is not None}
    changed = rename_seed_files(files, rename)
    if changed:
        copy_into_fat(path, changed)
    return len(changed)


def seed_dir_changes(root: Path, rename: Renamer) -> dict[str, bytes]:
    """The NoCloud seed files in the guest mounted at ``root`` whose content changes."""
    try:
        with nocloud_dir(root) as seed_dir:
            files = {n: d for n in NOCLOUD_NAMES if (d := read_guest_file(seed_dir, n)) is not None}
    except CloudImageError as e:
        log.debug("no NoCloud seed directory to update: %s", e)
        return {}
    return rename_seed_files(files, rename)


def hostname_change(root: Path, rename: Renamer) -> bytes | None:
    """The new content of the guest's /etc/hostname when it holds exactly the old name, else None."""
    with guest_dir(root, "etc") as etc:
        current = read_guest_file(etc, "hostname", limit=4096)
    renamed = rename(current.decode(errors="replace").strip()) if current else None
    return None if renamed is None else renamed.encode() + b"\n"


def guest_needs_rename(disk_path: str, layout: GuestLayout, arch: str, rename: Renamer, edit_hostname: bool) -> bool:
    """Whether anything in the guest carries the old name, looked at through a read-only mount.

    A guest with nothing to rename is then left as it was to the byte (mounting read-write alone
    rewrites an ext4 superblock): an import's rename keeps the disk identical to the export.  When
    the read-only mount fails (a journal to replay), assume there is something to do.
    """
    try:
        with ExitStack() as stack:
            mounted = mount_guest_root(disk_path, stack, arch=arch, layout=layout, read_only=True)
            if seed_dir_changes(mounted.path, rename):
                return True
            return edit_hostname and hostname_change(mounted.path, rename) is not None
    except (CloudImageError, OSError) as e:
        log.debug("cannot look at the guest read-only (%s); mounting it read-write", e)
        return True


def rename_guest(disk_path: str, arch: str, rename: Renamer, *, edit_hostname: bool = True) -> int:
    """Update the NoCloud seed directory and /etc/hostname in the guest filesystem of ``disk_path``."""
    layout = find_guest_layout(disk_path, arch)  # SeedError before anything is attached when there is no FS
    if not guest_needs_rename(disk_path, layout, arch, rename, edit_hostname):
        return 0
    count = 0
    with ExitStack() as stack:
        mounted = mount_guest_root(disk_path, stack, arch=arch, layout=layout)
        changes = seed_dir_changes(mounted.path, rename)
        if changes:
            with nocloud_dir(mounted.path) as seed_dir:
                for name, data in changes.items():
                    write_guest_file(seed_dir, name, data)
                    count += 1
        hostname = hostname_change(mounted.path, rename) if edit_hostname else None
        if hostname is not None:
            with guest_dir(mounted.path, "etc") as etc:
                write_guest_file(etc, "hostname", hostname, mode=0o644)
            count += 1
    return count


def rename_partition_seed(disk_path: str, part: Partition, rename: Renamer) -> int:
    counts: list[int] = []

    def edit(image: str) -> bool:
        counts.append(rename_seed_disk(image, part.label or "", rename))
        return counts[0] > 0

    edit_partition(disk_path, part, edit)
    return counts[0]


def rename_disk0(disk_path: str, arch: str, rename: Renamer, *, may_mount: bool) -> int:
    """Rename in disk 0's seed partition, and in its guest filesystem when the node may mount it."""
    part = find_partition_seed(disk_path)
    count = 0 if part is None else rename_partition_seed(disk_path, part, rename)
    if may_mount:
        count += rename_guest(disk_path, arch, rename)
    elif part is None:
        log.info("disk 0 has no seed partition, and the guest filesystem of an untrusted image is never mounted")
    return count


def rename_seeds(genv: GanetiEnv, site: SiteConfig | None = None, *, may_mount: bool = True) -> None:
    """Put the new instance name into every seed found; warn (never raise) on a disk's problem.
    ``may_mount``: whether the node may mount the instance's image (sources/trust.py)."""
    instance = genv.require_instance()
    old, new = genv.old_instance_name or "", instance.name
    if genv.params.get("hostname"):
        log.info("the hostname parameter is set; the seed keeps it")
        return
    if not old or old == new:  # run_rename stops before this; equal values must not be rewritten
        return
    rename = make_renamer(old, new)
    arch = genv.params.get("arch") or host_architecture()
    for disk in instance.disks:
        if disk.path is None and disk.uri is not None:
            # Staging a whole disk out of its URI and back is no price for a cosmetic change; say
            # so, or "renamed" reads as if the guest's hostname had changed.
            log.info("disk %d is reachable only through a URI; its seed keeps the old name %s", disk.index, old)
            continue
        if disk.path is None or disk.access != "rw":
            continue
        try:
            if disk.index == 0:
                n = rename_disk0(disk.path, arch, rename, may_mount=may_mount)
            elif (label := seed_label_of(disk.path)) is not None:
                n = rename_seed_disk(disk.path, label, rename)
            else:
                continue
            if n:
                log.info("disk %d: %d seed file(s) now carry the name %s", disk.index, n, new)
            else:
                log.info("disk %d: nothing on it carries the old name; left untouched", disk.index)
        except (CloudImageError, OSError, ValueError) as e:
            log.warning("disk %d: the seed keeps the old name (%s)", disk.index, e)
