"""Local staging files for disks reachable only through a URI (disk/uri.py).

A staging file is a sparse file as large as the disk, private (0600) in the site's staging
directory (``[Disks] StagingDirectory``, default ``<cache-dir>/staging``).  It costs the disk's
*data*, never its size: writers skip or punch holes for zeros and qemu-img copies only allocated
regions.  It is removed through the caller's ExitStack, on success, failure and SIGTERM alike.

``StagedDisks`` gives the create pipeline a local path for each URI-only disk it touches: disk 0
starts empty (the image overwrites it whole), a seed disk is first copied in (the seed code looks
at what it holds before overwriting it).  ``write_back`` then copies every staged disk to its URI.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from instance_cloudimage.disk.uri import copy_from_uri, copy_to_uri, uri_size
from instance_cloudimage.ganeti.env import Disk
from instance_cloudimage.ganeti.uri import check_uri, redact_uri
from instance_cloudimage.runtime.errors import ConversionError
from instance_cloudimage.runtime.log import complete_step, format_size
from instance_cloudimage.runtime.siteconfig import SiteConfig

log = logging.getLogger(__name__)


def staging_dir(site: SiteConfig) -> Path:
    configured = site.get("staging_dir")
    return Path(configured) if configured else site.paths.cache_dir / "staging"


def full_error(site: SiteConfig) -> ConversionError:
    return ConversionError(f"the staging directory {staging_dir(site)} is full",
                           "a disk reachable only through a URI needs room for its data there; free space "
                           "or set [Disks] StagingDirectory")


def make_staging_file(site: SiteConfig, size: int, stack: ExitStack) -> Path:
    """A new sparse file of ``size`` bytes, removed when ``stack`` unwinds.  Raises ConversionError."""
    directory = staging_dir(site)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, name = tempfile.mkstemp(dir=directory, prefix="staging-", suffix=".img")
    except OSError as e:
        raise ConversionError(f"cannot create a staging file in {directory}: {e.strerror}",
                              "check [Disks] StagingDirectory") from None
    path = Path(name)
    stack.callback(path.unlink, missing_ok=True)
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise ConversionError(f"cannot size a staging file in {directory}: {e.strerror}") from None
    finally:
        os.close(fd)
    return path


def raise_if_full(e: OSError, site: SiteConfig) -> None:
    """Turn running out of staging space into a one-line error; re-raise anything else."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise full_error(site) from None
    raise e


@contextmanager
def staging_errors(site: SiteConfig, *, active: bool = True) -> Iterator[None]:
    """Running out of staging space is a one-line error, not a traceback (when ``active``: a
    staging file is in use)."""
    try:
        yield
    except OSError as e:
        if not active:
            raise
        raise_if_full(e, site)


def stage_uri(site: SiteConfig, uri: str, variable: str, name: str, stack: ExitStack, *, copy_in: bool) -> Path:
    """A staging file for the disk at ``uri`` (given as ``variable``, shown as ``name``), removed
    when ``stack`` unwinds: a copy of the disk with ``copy_in``, else reading zeros.
    Raises EnvironmentError_ or ConversionError."""
    check_uri(uri, variable)
    size = uri_size(uri)
    path = make_staging_file(site, size, stack)
    if copy_in:
        with staging_errors(site), complete_step(f"copying {name} ({format_size(size)}) from {redact_uri(uri)}"):
            copy_from_uri(uri, path)
    log.info("%s (%s, %s) is staged in %s", name, redact_uri(uri), format_size(size), path)
    return path


class StagedDisks:
    """The create pipeline's URI-only disks, staged locally on first use."""

    def __init__(self, site: SiteConfig, stack: ExitStack, *, target_is_zero: bool) -> None:
        self.site = site
        self.stack = stack
        self.target_is_zero = target_is_zero
        self.staged: dict[int, tuple[Disk, Path, bool]] = {}  # index -> (disk, staging file, copied in)

    def local(self, disk: Disk, *, copy_in: bool) -> Disk:
        """``disk`` with a local path: itself if it has one, else its staging file.

        ``copy_in``: the staging file starts as a copy of the disk (else it reads zeros, for a
        disk that is overwritten whole).  Raises EnvironmentError_ or ConversionError.
        """
        if disk.path is not None:
            return disk
        if disk.index in self.staged:
            return dataclasses.replace(disk, path=os.fspath(self.staged[disk.index][1]))
        assert disk.uri is not None  # ganeti/env.py: a disk has a path or a URI
        path = stage_uri(self.site, disk.uri, f"DISK_{disk.index}_URI", f"disk {disk.index}", self.stack,
                         copy_in=copy_in)
        self.staged[disk.index] = (disk, path, copy_in)
        return dataclasses.replace(disk, path=os.fspath(path))

    def write_back(self) -> None:
        """Copy every staged disk to its URI, disk 0 first.  Raises ConversionError.

        ``target_is_zero`` (the site says new disks read zeros, and this is a first install) lets
        qemu-img skip the holes of a disk that was not copied in.
        """
        for index in sorted(self.staged):
            disk, path, copied_in = self.staged[index]
            assert disk.uri is not None
            data = os.stat(path).st_blocks * 512
            with complete_step(f"writing disk {index} ({format_size(data)} of data) to {redact_uri(disk.uri)}"):
                # A copied-in disk's zeros may be new (wipefs, a rewritten FAT): they must be written.
                copy_to_uri(path, disk.uri, target_is_zero=self.target_is_zero and not copied_in)
            with suppress(OSError):  # its space is not needed any more; the stack would do it later
                path.unlink()
