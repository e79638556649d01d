"""The built-in ``demo`` image: a small real GPT disk with an ext4 root, made on the spot.

It lets the README's first command (and the tests) run the whole create pipeline with no
network: a GPT partition table written by sfdisk, an ext4 root filesystem populated by
``mke2fs -d`` at the partition's offset (no loop device, no mount), converted to a compressed
qcow2, and kept in the cache directory so later creates reuse it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from instance_cloudimage.disk.partitions import ROOT_TYPES
from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.runtime.process import run
from instance_cloudimage.sources.cache import unusable_cache

log = logging.getLogger(__name__)

DEMO_VERSION = "1"
DISK_MIB = 128
FIRST_SECTOR = 2048

FILES = {
    "etc/os-release": (
        'PRETTY_NAME="instance-cloudimage demo"\nNAME="instance-cloudimage demo"\n'
        "ID=cloudimage-demo\nVERSION_ID=" + DEMO_VERSION + "\n"
    ),
    "etc/hostname": "localhost\n",
    "etc/fstab": "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n",
    "etc/cloud/cloud.cfg.d/.keep": "",
    "var/lib/cloud/.keep": "",
    "root/.keep": "",
}


def _populate(root: Path) -> None:
    for rel, content in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)


def build_demo_raw(path: Path) -> None:
    """Write the demo disk as a sparse raw file at ``path``."""
    size = DISK_MIB * 1024 * 1024
    with open(path, "wb") as f:
        f.truncate(size)
    # Leave 33 sectors for the backup GPT at the end.
    part_sectors = size // 512 - FIRST_SECTOR - 33
    part_sectors -= part_sectors % 2048
    table = f"label: gpt\nstart={FIRST_SECTOR}, size={part_sectors}, type={ROOT_TYPES['x86_64']}, name=root\n"
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", os.fspath(path)], input=table.encode())
    with tempfile.TemporaryDirectory(prefix="demo-root-") as tmp:
        _populate(Path(tmp))
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "cloudimg-rootfs", "-d", tmp,
             "-E", f"offset={FIRST_SECTOR * 512}", os.fspath(path), f"{part_sectors // 2}k"],
            env={"E2FSPROGS_FAKE_TIME": "1700000000"})


def build_demo_image(name: str, cache_dir: Path) -> Path:
    """Return the path of the built-in image ``name``, building it into the cache if needed."""
    if name != "demo":
        raise ParameterError(f"unknown built-in image {name!r}")
    out_dir = cache_dir / "builtin"
    out = out_dir / f"demo-{DEMO_VERSION}.qcow2"
    if out.is_file():
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unusable_cache(cache_dir, e) from None
    log.info("building the demo image in %s", out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        raw = Path(tmp) / "demo.raw"
        build_demo_raw(raw)
        qcow = Path(tmp) / "demo.qcow2"
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", os.fspath(raw), os.fspath(qcow)])
        os.replace(qcow, out)  # atomic: concurrent builders each produce a complete file
    return out
