"""The disk of an import or an export, as a local path (both verbs share it).

Both import and export run with Ganeti's non-reset environment (LC_ALL=C, the node daemon's
variables); that is harmless, since ganeti/env.py parses only the variables it knows.  A disk
reachable only through a URI (IMPORT_DISK_URI/EXPORT_DISK_URI) goes through a local staging file
(disk/staging.py).
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass

from instance_cloudimage.disk.staging import stage_uri
from instance_cloudimage.ganeti.env import GanetiEnv
from instance_cloudimage.ganeti.uri import redact_uri
from instance_cloudimage.runtime.errors import EnvironmentError_
from instance_cloudimage.runtime.siteconfig import SiteConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferDisk:
    """The disk of an import or export, as a local path: the device, or a URI's staging file."""

    path: str
    uri: str | None = None  # set when ``path`` is a staging file standing in for this URI

    def describe(self) -> str:
        return redact_uri(self.uri) if self.uri else self.path


def transfer_disk(genv: GanetiEnv, site: SiteConfig, stack: ExitStack, word: str) -> TransferDisk:
    """The local path to read (EXPORT) or write (IMPORT).  A URI-only disk gets a staging file,
    removed when ``stack`` unwinds; for an export it is first filled from the URI.
    Raises EnvironmentError_ or ConversionError."""
    t = genv.transfer
    if t is None:
        raise EnvironmentError_(f"${word}_DEVICE or ${word}_DISK_URI must be set")
    if t.device is not None:
        return TransferDisk(t.device)
    assert t.uri is not None  # ganeti/env.py: a transfer has a device or a URI
    staging = stage_uri(site, t.uri, f"{word}_DISK_URI", "the disk", stack, copy_in=word == "EXPORT")
    return TransferDisk(os.fspath(staging), t.uri)
