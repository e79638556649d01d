"""Disks reachable only through a URI, read and written by qemu-img (ganeti/uri.py parses them).

Such a disk has no kernel block device: it cannot be looped or mounted, so the scripts work on a
local sparse staging file (disk/staging.py) and qemu-img copies between it and the URI:

* onto the URI: ``qemu-img convert -n`` onto the existing image.  The staging file's holes become
  zero writes (NBD/RBD write-zeroes, cheap), so the disk ends up exactly like the staging file
  whatever it held before; ``--target-is-zero`` skips them only when the caller knows the disk
  reads zeros.
* from the URI: ``qemu-img convert`` into the staging file.  qemu-img asks the driver which
  regions are allocated (block status, the same data ``qemu-img map`` prints), so only data
  crosses the network and lands in the staging file.

The URI is only ever an argv element, and shown only redacted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from instance_cloudimage.ganeti.uri import redact_uri
from instance_cloudimage.runtime.errors import CommandError, ConversionError
from instance_cloudimage.runtime.process import run, run_text

QEMU_ENV = {"MALLOC_ARENA_MAX": "3"}
INFO_TIMEOUT = 300.0


def failed(what: str, e: CommandError, uri: str) -> ConversionError:
    """``what`` failed: qemu-img's last error line, the URI in it redacted."""
    line = e.last_line.replace(uri, redact_uri(uri))
    # Debian ships the rbd, gluster, iscsi and ssh drivers as modules in another package.
    hint = "install the Debian package qemu-block-extra on this node" if "qemu-block-extra" in e.stderr else None
    return ConversionError(f"{what} {redact_uri(uri)} failed: {line}", hint)


def uri_size(uri: str) -> int:
    """The size in bytes of the raw disk at ``uri``.  Raises ConversionError."""
    try:
        out = run_text(["qemu-img", "info", "--output=json", "-f", "raw", uri], env=QEMU_ENV, timeout=INFO_TIMEOUT)
        size = int(json.loads(out)["virtual-size"])
    except CommandError as e:
        raise failed("opening the disk at", e, uri) from None
    except (ValueError, KeyError, TypeError):
        raise ConversionError(f"qemu-img reported no size for the disk at {redact_uri(uri)}") from None
    return size


def staging_opts(path: Path) -> str:
    """--image-opts for the local staging file, so that its name is never parsed as a protocol."""
    return f"driver=raw,file.driver=file,file.filename={os.path.abspath(path).replace(',', ',,')}"


def copy_to_uri(staging: Path, uri: str, *, target_is_zero: bool = False) -> None:
    """Make the disk at ``uri`` hold the staging file's bytes (its first len(staging) bytes).

    ``target_is_zero``: the caller knows the disk reads zeros, so holes need no zero writes.
    Raises ConversionError.
    """
    # -W: writes in any order; the target is a fixed-size raw disk, where that only adds throughput.
    argv = ["qemu-img", "convert", "-n", "-q", "-W", "--image-opts", staging_opts(staging), "-O", "raw"]
    if target_is_zero:
        argv.append("--target-is-zero")
    try:
        run([*argv, uri], env=QEMU_ENV)
    except CommandError as e:
        raise failed("writing the disk at", e, uri) from None


def copy_from_uri(uri: str, staging: Path) -> None:
    """Copy the disk at ``uri`` into the staging file (as large as the disk, sparse).  Raises ConversionError."""
    argv = ["qemu-img", "convert", "-n", "-q", "-W", "-f", "raw", uri, "--target-image-opts", staging_opts(staging)]
    try:
        run(argv, env=QEMU_ENV)
    except CommandError as e:
        raise failed("reading the disk at", e, uri) from None
