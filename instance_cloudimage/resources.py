"""Where the shipped variants, scripts and hooks are.

Installed normally they are subpackages (see pyproject's package-dir); in an editable install or
a plain checkout they are the repository's top-level directories beside the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_TOP_LEVEL = {"variants": "shipped_variants", "scripts": "shipped_scripts", "hooks.d": "shipped_hooks"}


def shipped_dir(name: str) -> Path:
    """``name`` is the repository directory: variants, scripts or hooks.d."""
    checkout = Path(__file__).resolve().parent.parent / name
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files(f"instance_cloudimage.{_TOP_LEVEL[name]}")))
