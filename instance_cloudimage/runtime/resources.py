"""Where the shipped variants, scripts and hooks are.

Installed normally (a wheel) they are subdirectories of the package (see pyproject's
package-dir); in an editable install or a plain checkout they are the repository's top-level
directories beside the package.
"""

from __future__ import annotations

from pathlib import Path

_TOP_LEVEL = {"variants": "shipped_variants", "scripts": "shipped_scripts", "hooks.d": "shipped_hooks"}
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # instance_cloudimage/, above runtime/


def shipped_dir(name: str) -> Path:
    """``name`` is the repository directory: variants, scripts or hooks.d."""
    # The installed location first: beside an installed package, parent/<name> could be an
    # unrelated top-level directory of site-packages (e.g. another project's "scripts").
    # importlib.resources is no help here: these data directories are namespace packages, for
    # which files() returns a MultiplexedPath whose str() is not a path.
    installed = _PACKAGE_DIR / _TOP_LEVEL[name]
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / name
