"""Ganeti environments, variants and cloud-init read-back for the seed delivery tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from instance_cloudimage.ganeti.env import GanetiEnv, Script, parse_environment
from instance_cloudimage.ganeti.simulate import SimulatedDisk, SimulatedTransfer, simulated_environment
from instance_cloudimage.ganeti.variants import Variant, load_variant
from instance_cloudimage.runtime.siteconfig import Paths
from instance_cloudimage.seed.deliver import SeedPlan, deliver_seed
from tests.support import guest_images as gi

# The project's reader (written with the data side): Debian's cloud-init datasource code, user-data
# processor and config modules, with everything that would change this host recorded instead.
# The project's reader (written with the data side): Debian's cloud-init datasource code, user-data
# processor and config modules, with everything that would change this host recorded instead.
READER = Path(__file__).with_name("cloudinit_reader.py")
CLOUDINIT_PYTHON = "/usr/bin/python3"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5Zm9ydGVzdGluZ29ubHkxMjM0NTY3ODkw test@example"

# The instance's UUID stays the same across renames, as in Ganeti.
INSTANCE_UUID = str(uuid.uuid5(uuid.NAMESPACE_DNS, "test-instance"))


def environ(disks: Sequence[SimulatedDisk | Path], *, name: str = "vm1.example.org",
            params: Mapping[str, str] | None = None, reinstall: bool = False, nics: int | Sequence[str] = 1,
            old_name: str | None = None, variant: str = "test", instance_uuid: str = INSTANCE_UUID,
            transfer: SimulatedTransfer | None = None) -> dict[str, str]:
    """simulated_environment for the instance ``name`` (of the variant ``test``, one NIC)."""
    return simulated_environment(variant, disks, instance_name=name, instance_uuid=instance_uuid, nics=nics,
                                 params=params, reinstall=reinstall, old_name=old_name, transfer=transfer)


def ganeti_env(disks: Sequence[Path], script: Script = Script.CREATE, **kw: Any) -> GanetiEnv:
    return parse_environment(environ(disks, **kw), script)


def make_variant(config_dir: Path, *, agent: str = "cloud-init", seed: str = "auto", grow: bool = False,
                 name: str = "test") -> Variant:
    d = config_dir / "variants"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.conf").write_text(
        f"[Variant]\nAgent = {agent}\nSeed = {seed}\nGrowRoot = {'yes' if grow else 'no'}\n"
        "Architectures = x86_64\n[Image]\nURL = builtin:demo\n")
    return load_variant(name, Paths(config_dir=config_dir, cache_dir=config_dir / "cache"))


def deliver(genv: GanetiEnv, variant: Variant, stack: ExitStack) -> SeedPlan:
    """deliver_seed as create calls it, onto disk 0 of ``genv``'s instance (x86_64)."""
    return deliver_seed(genv, variant, genv.require_instance().disks[0].path or "", "x86_64", stack)


def expected_files(genv: GanetiEnv, variant: Variant, kind: str) -> dict[str, bytes]:
    """What the data side builds for this instance."""
    from instance_cloudimage.seed.configdrive import build_configdrive
    from instance_cloudimage.seed.content import build_nocloud, seed_input

    inp = seed_input(genv, variant, nonce="test")
    return dict((build_nocloud(inp) if kind == "nocloud" else build_configdrive(inp)).files)


def run_reader(kind: str, directory: Path) -> dict[str, Any]:
    """What cloud-init reads from a NoCloud seed directory or the root of a config drive."""
    with tempfile.TemporaryDirectory(prefix="reader-") as work:
        proc = subprocess.run([CLOUDINIT_PYTHON, os.fspath(READER), kind, os.fspath(directory), work],
                              capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def read_nocloud_in_guest(img: Path, arch: str = "x86_64") -> dict[str, Any]:
    """Copy the guest's /var/lib/cloud/seed/nocloud out (read-only mount) and let cloud-init read it."""
    from contextlib import ExitStack

    from instance_cloudimage.disk.mount import mount_guest_root

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        m = mount_guest_root(os.fspath(img), stack, arch=arch)
        seed = m.path / "var/lib/cloud/seed/nocloud"
        st = os.stat(seed, follow_symlinks=False)
        modes = {p.name: (p.stat().st_mode & 0o7777, p.stat().st_uid) for p in seed.iterdir()}
        shutil.copytree(seed, Path(tmp) / "nocloud")
        stack.close()
        result = run_reader("nocloud", Path(tmp) / "nocloud")
    result["dir_mode"] = st.st_mode & 0o7777
    result["file_modes"] = modes
    return result


def extract_fat(disk: Path, dest: Path, offset: int = 0) -> Path:
    """Copy out the files of the FAT on ``disk`` (at byte ``offset``: one in a partition)."""
    dest.mkdir(parents=True, exist_ok=True)
    image = f"{disk}@@{offset}" if offset else os.fspath(disk)
    gi.sh("mcopy", "-s", "-n", "-i", image, "::/*", os.fspath(dest), env={"MTOOLS_SKIP_CHECK": "1"})
    return dest


def read_fat_seed(disk: Path, kind: str, offset: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return run_reader(kind, extract_fat(disk, Path(tmp) / "seed", offset))


def variant_loader(tmp_path: Path, old_ci_user: str) -> Callable[[str], Variant]:
    """Loads shipped variants plus two site ones: ``flamingo-test`` (config drive) and
    ``old-ci`` (network-config v1, DefaultUser ``old_ci_user``)."""
    site = tmp_path / "etc" / "variants"
    site.mkdir(parents=True)
    (site / "flamingo-test.conf").write_text(
        "[Variant]\nAgent = flamingo\nSeed = configdrive-disk\n[Image]\nURL = https://example.test/x.qcow2\n")
    (site / "old-ci.conf").write_text(
        f"[Variant]\nNetworkConfigVersion = 1\nDefaultUser = {old_ci_user}\n[Image]\nURL = https://example.test/y.qcow2\n")
    paths = Paths(tmp_path / "etc", tmp_path / "cache")
    return lambda name: load_variant(name, paths)


def seed_partition_of(disk: Path) -> tuple[int, int, str]:
    """(offset, size, label) of the FAT seed partition (CIDATA or config-2) on ``disk``."""
    table = json.loads(gi.sh("sfdisk", "--json", os.fspath(disk)))["partitiontable"]
    for p in table["partitions"]:
        probe = gi.sh("blkid", "-p", "-o", "export", "-O", str(p["start"] * 512), os.fspath(disk))
        fields = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
        if fields.get("TYPE") == "vfat" and fields.get("LABEL") in ("CIDATA", "config-2"):
            return p["start"] * 512, p["size"] * 512, fields["LABEL"]
    raise AssertionError(f"no seed partition on {disk}: {table}")


def read_seed_partition(disk: Path, kind: str) -> dict[str, Any]:
    """What Debian's cloud-init reads from the seed partition (its files copied out with mtools)."""
    offset, _, _ = seed_partition_of(disk)
    return read_fat_seed(disk, kind, offset)
