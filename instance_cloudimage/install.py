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
import sys
from pathlib import Path

from .config import Paths
from .env import Script
from .errors import ConfigError
from .launch import WORKER_SOCKET
from .params import render_parameters_list
from .resources import shipped_dir
from .variants import list_variants, load_variant

log = logging.getLogger(__name__)

DEFAULT_OS_DIR = Path("/srv/ganeti/os/cloudimage")
INSTALL_INFO = "instance-cloudimage.json"
SCRIPTS = (Script.CREATE, Script.IMPORT, Script.EXPORT, Script.RENAME, Script.VERIFY)


def _write_atomic(path: Path, content: str, mode: int) -> None:
    # Imported where used: every OS script imports this module for installed_paths, and
    # tempfile (shutil, random with it) is not on create's path to qemu-img.
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_script(verb: str, python: str, worker: str | None = None) -> str:
    """scripts/<verb> with this interpreter and this package's location baked in.

    The interpreter runs isolated and without site (-IS): site and an editable install's import
    hooks cost up to ~15 ms on every run, and launch.py needs only the package, which the script
    finds on the path it puts first.  A script that runs itself (no worker) loads site then."""
    template = (shipped_dir("scripts") / verb).read_text()
    lines = template.split("\n")
    call = f'run_script("{verb}")'
    entry = "from instance_cloudimage.launch import run_script"
    if not lines[0].startswith("#!") or entry not in lines or call not in template:
        raise ConfigError(f"the shipped script {verb} is not the expected template; reinstall instance-cloudimage")
    package_parent = os.fspath(Path(__file__).resolve().parent.parent)
    at = lines.index(entry)
    lines[at:at] = ["import sys", "", f"sys.path.insert(0, {package_parent!r})  # -S: see install.render_script"]
    lines[at + 3] += "  # noqa: E402"
    body = "\n".join(lines[1:])
    if worker is not None:
        body = body.replace(call, f'run_script("{verb}", worker={worker!r})')
    return f"#!{python} -IS\n{body}"


def install_os(os_dir: Path, paths: Paths, python: str | None = None, worker: str | None = None) -> list[str]:
    """Write the OS definition into ``os_dir``; return the variants it lists."""
    python = python or sys.executable
    variants = list_variants(paths)
    for name in variants:
        load_variant(name, paths)  # refuse to install a definition with a broken variant
    if not variants:
        raise ConfigError("no variants found; nothing to install")
    try:
        os_dir.mkdir(parents=True, exist_ok=True)
        for verb in SCRIPTS:
            _write_atomic(os_dir / verb.value, render_script(verb.value, python, worker), 0o755)
        _write_atomic(os_dir / "ganeti_api_version", "20\n", 0o644)
        _write_atomic(os_dir / "variants.list", "".join(f"{v}\n" for v in variants), 0o644)
        _write_atomic(os_dir / "parameters.list", render_parameters_list(), 0o644)
        info = {"config_dir": os.fspath(paths.config_dir), "cache_dir": os.fspath(paths.cache_dir)}
        _write_atomic(os_dir / INSTALL_INFO, json.dumps(info, indent=2) + "\n", 0o644)
        # A create_untrusted would make Ganeti run the helper-VM path, which needs an install image.
        (os_dir / "create_untrusted").unlink(missing_ok=True)
    except OSError as e:
        why = "a parent is not a directory" if isinstance(e, FileExistsError) else e.strerror
        raise ConfigError(f"cannot install the OS definition into {os_dir}: {why}") from None
    return variants


WORKER_UNIT = "instance-cloudimage-worker"


def render_worker_units(python: str, socket: str = WORKER_SOCKET) -> dict[str, str]:
    """systemd units for the warm worker, socket-activated at ``socket`` (the scripts' own)."""
    return {
        f"{WORKER_UNIT}.socket": f"""[Unit]
Description=instance-cloudimage warm worker socket (Ganeti OS scripts start without their imports)

[Socket]
ListenStream={socket}
SocketMode=0600
DirectoryMode=0700

[Install]
WantedBy=sockets.target
""",
        f"{WORKER_UNIT}.service": f"""[Unit]
Description=instance-cloudimage warm worker (forks a child per Ganeti OS script run)
Requires={WORKER_UNIT}.socket
After={WORKER_UNIT}.socket

[Service]
ExecStart={python} -P -m instance_cloudimage worker
# Runs in progress are children: stopping or restarting the worker must leave them running.
KillMode=process
Restart=on-failure
""",
    }


def install_worker_units(unit_dir: Path, python: str | None = None, socket: str | None = None) -> list[str]:
    """Write the worker's systemd units into ``unit_dir``; return their names."""
    units = render_worker_units(python or sys.executable, socket or WORKER_SOCKET)
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            _write_atomic(unit_dir / name, text, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write the worker's systemd units into {unit_dir}: {e.strerror}") from None
    return list(units)


def installed_paths(script_path: str) -> Paths:
    """The Paths baked into the OS directory that holds ``script_path`` (defaults otherwise)."""
    info_file = Path(script_path).resolve().parent / INSTALL_INFO
    try:
        info = json.loads(info_file.read_text())
    except FileNotFoundError:
        return Paths()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{info_file} is unreadable ({e}); re-run 'instance-cloudimage install'") from None
    return Paths(config_dir=Path(info["config_dir"]), cache_dir=Path(info["cache_dir"]))
