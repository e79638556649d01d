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
import tempfile
from pathlib import Path

from .config import Paths
from .env import Script
from .errors import ConfigError
from .params import render_parameters_list
from .resources import shipped_dir
from .variants import list_variants, load_variant

log = logging.getLogger(__name__)

DEFAULT_OS_DIR = Path("/srv/ganeti/os/cloudimage")
INSTALL_INFO = "instance-cloudimage.json"
SCRIPTS = (Script.CREATE, Script.IMPORT, Script.EXPORT, Script.RENAME, Script.VERIFY)


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


def install_os(os_dir: Path, paths: Paths, python: str | None = None) -> list[str]:
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
            _write_atomic(os_dir / verb.value, render_script(verb.value, python), 0o755)
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
