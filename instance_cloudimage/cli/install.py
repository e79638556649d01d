"""``instance-cloudimage install``: lay out a valid Ganeti OS definition.

Ganeti runs the scripts with a reset environment (PATH=/sbin:/bin:/usr/sbin:/usr/bin, no HOME,
cwd = the OS directory), so each installed script names the exact interpreter this package was
installed with, in isolated mode, and the config/cache directories are baked into a JSON file
beside the scripts.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from instance_cloudimage.ganeti.env import Script
from instance_cloudimage.ganeti.variants import (
    default_offered,
    list_variants,
    load_variant,
    read_offered,
    render_variants_list,
)
from instance_cloudimage.params.table import render_parameters_list
from instance_cloudimage.runtime.errors import ConfigError
from instance_cloudimage.runtime.process import run
from instance_cloudimage.runtime.resources import shipped_dir
from instance_cloudimage.runtime.siteconfig import INSTALL_INFO, Paths

log = logging.getLogger(__name__)

DEFAULT_OS_DIR = Path("/srv/ganeti/os/cloudimage")
# Where the Debian package has it (debian/rules' OS_DIR), and Ganeti's search path as Debian's
# ganeti package builds it: the same OS name in two of these is two entries, one shadowing the other.
PACKAGE_OS_DIR = Path("/usr/share/ganeti/os/cloudimage")
OS_SEARCH_PATH = tuple(Path(d) for d in ("/srv/ganeti/os", "/usr/local/lib/ganeti/os", "/usr/lib/ganeti/os",
                                         "/usr/share/ganeti/os"))
SCRIPTS = (Script.CREATE, Script.IMPORT, Script.EXPORT, Script.RENAME, Script.VERIFY)

# The warm worker of earlier versions: 'install --systemd-dir DIR' wrote these two units (the
# README's DIR was /etc/systemd/system; a unit elsewhere on systemd's search path ran too), and
# systemd made the socket they listen on.
OLD_WORKER_UNITS = ("instance-cloudimage-worker.socket", "instance-cloudimage-worker.service")
OLD_UNIT_DIRS = tuple(Path(d) for d in ("/etc/systemd/system", "/usr/local/lib/systemd/system",
                                        "/usr/lib/systemd/system", "/lib/systemd/system"))
OLD_WORKER_SOCKET = Path("/run/instance-cloudimage/worker.sock")
SYSTEMD_BOOTED = Path("/run/systemd/system")  # sd_booted(): systemd runs this machine


def _write_atomic(path: Path, content: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_script(verb: str, python: str) -> str:
    """scripts/<verb> with this interpreter on line 1, in isolated mode (-I): no PYTHON*
    variable, user site-packages or file beside the script changes what it imports."""
    template = (shipped_dir("scripts") / verb).read_text()
    body = template.split("\n", 1)[1] if template.startswith("#!") else template
    return f"#!{python} -I\n{body}"


def staged(path: Path, destdir: Path | None) -> Path:
    """``path`` inside the staging tree of a package build, or ``path`` itself."""
    return destdir / path.relative_to(path.anchor) if destdir else path


def _symlink_atomic(path: Path, target: Path) -> None:
    tmp = path.parent / f".{path.name}.new"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, path)


def prepare_variants_list(paths: Paths, read_paths: Paths) -> list[str]:
    """The variants the node offers: ``<config-dir>/variants.list`` as the administrator left it,
    or, the first time, a new one with every variant but the demo.  Raises ConfigError."""
    variants = list_variants(read_paths)
    for name in variants:
        load_variant(name, read_paths)  # refuse to install a definition with a broken variant
    if not variants:
        raise ConfigError("no variants found; nothing to install")
    offered = read_offered(read_paths)
    if offered is not None:
        unknown = [n for n in offered if n not in variants]
        if unknown:
            raise ConfigError(f"{read_paths.variants_list} lists unknown variants: {' '.join(unknown)}",
                              "remove them, or add their files to the variants directory")
        return offered
    offered = default_offered(read_paths)
    try:
        read_paths.config_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(read_paths.variants_list, render_variants_list(offered, paths.variants_list), 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write {read_paths.variants_list}: {e.strerror}") from None
    return offered


def install_os(os_dir: Path, paths: Paths, python: str | None = None, destdir: Path | None = None) -> list[str]:
    """Write the OS definition into ``os_dir``; return the variants it offers.

    With ``destdir`` (a package build) every file goes below it, while what is baked in (the
    interpreter, the directories, the variants.list link) names the installed paths, and the
    build machine's own site variants stay out.  The OS definition's variants.list is a link to
    ``<config-dir>/variants.list``, the list the administrator edits (instance-debootstrap's way).
    """
    python = python or sys.executable
    os_dir = Path(os.path.abspath(os_dir))
    paths = Paths(Path(os.path.abspath(paths.config_dir)), Path(os.path.abspath(paths.cache_dir)))
    read_paths = Paths(staged(paths.config_dir, destdir), paths.cache_dir)
    offered = prepare_variants_list(paths, read_paths)
    target = staged(os_dir, destdir)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for verb in SCRIPTS:
            _write_atomic(target / verb.value, render_script(verb.value, python), 0o755)
        _write_atomic(target / "ganeti_api_version", "20\n", 0o644)
        _symlink_atomic(target / "variants.list", paths.variants_list)
        _write_atomic(target / "parameters.list", render_parameters_list(), 0o644)
        info = {"config_dir": os.fspath(paths.config_dir), "cache_dir": os.fspath(paths.cache_dir)}
        _write_atomic(target / INSTALL_INFO, json.dumps(info, indent=2) + "\n", 0o644)
        # A create_untrusted would make Ganeti run the helper-VM path, which needs an install image.
        (target / "create_untrusted").unlink(missing_ok=True)
    except OSError as e:
        why = "a parent is not a directory" if isinstance(e, FileExistsError) else e.strerror
        raise ConfigError(f"cannot install the OS definition into {target}: {why}") from None
    return offered


def warn_if_shadowing(os_dir: Path) -> None:
    """Say so when this install and the package's are both in Ganeti's search path."""
    os_dir = Path(os.path.abspath(os_dir))
    if os_dir != PACKAGE_OS_DIR and os_dir.parent in OS_SEARCH_PATH and (PACKAGE_OS_DIR / "create").exists():
        log.warning("warning: the package ganeti-instance-cloudimage has this OS in %s too; Ganeti uses the "
                    "first in its search path, and Ganeti 3.0's gnt-os diagnose fails on a shadowed OS "
                    "(remove %s, or the package)", PACKAGE_OS_DIR, os_dir)


def listen_paths(socket_unit: Path) -> list[Path]:
    """The socket paths a worker socket unit listens on ('install --worker-socket' chose them)."""
    try:
        text = socket_unit.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    return [Path(value) for line in text.splitlines()
            if line.startswith("ListenStream=") and (value := line.partition("=")[2].strip()).startswith("/")]


def remove_old_worker(unit_dirs: Sequence[Path] | None = None, socket: Path | None = None) -> list[Path]:
    """Stop, disable and delete the warm worker an earlier version installed: its units in
    ``unit_dirs`` (default OLD_UNIT_DIRS) and its sockets, at ``socket`` (default
    OLD_WORKER_SOCKET) and where the socket unit listened.  Returns what was removed."""
    unit_dirs = OLD_UNIT_DIRS if unit_dirs is None else unit_dirs
    socket = OLD_WORKER_SOCKET if socket is None else socket
    units = [d / name for d in unit_dirs for name in OLD_WORKER_UNITS if os.path.lexists(d / name)]
    sockets = [socket, *(p for d in unit_dirs for p in listen_paths(d / OLD_WORKER_UNITS[0]))]
    booted = bool(units) and SYSTEMD_BOOTED.is_dir()
    stopped = False
    if booted:
        result = run(["systemctl", "disable", "--now", *OLD_WORKER_UNITS], check=False)
        stopped = result.returncode == 0
        if not stopped:
            log.warning("systemctl disable --now %s failed: %s", " ".join(OLD_WORKER_UNITS),
                        result.stderr.decode(errors="replace").strip())
    # What 'systemctl enable' linked, for a machine where systemd does not run (an image, a chroot).
    links = [p for d in unit_dirs for name in OLD_WORKER_UNITS for p in d.glob(f"*.wants/{name}") if p.is_symlink()]
    removed = []
    for path in [*links, *units]:
        try:
            path.unlink()
        except OSError as e:
            log.warning("cannot remove %s, the warm worker's unit: %s", path, e.strerror)
            continue
        removed.append(path)
        if path in units:
            log.info("%s %s: this version has no warm worker", "stopped, disabled and removed" if stopped
                     else "removed", path)
    if booted:
        run(["systemctl", "daemon-reload"], check=False)
    for path in dict.fromkeys(sockets):
        try:
            if not stat.S_ISSOCK(path.lstat().st_mode):
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("cannot remove %s, the warm worker's socket: %s", path, e.strerror)
            continue
        removed.append(path)
        log.info("removed %s, the warm worker's socket", path)
    if socket == OLD_WORKER_SOCKET:
        with suppress(OSError):
            socket.parent.rmdir()  # systemd made it for the socket; left alone if not empty
    return removed
