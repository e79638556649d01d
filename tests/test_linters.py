"""ruff, mypy (strict, configured in pyproject.toml) and shellcheck as tests, so CI enforces them.

Skipped when the tool is not installed, except under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = os.fspath(beside) if beside.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{name} is not installed")
    return found


def run(*argv: str) -> None:
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout}{result.stderr}"


def writable(cache: Path) -> bool:
    return os.access(cache if cache.exists() else cache.parent, os.W_OK)


def test_ruff() -> None:
    # --no-cache: a checkout set up by root (sudo .ci/setup) has a cache others cannot write.
    run(tool("ruff"), "check", "--no-cache", "instance_cloudimage", "tests", "bench")


def test_mypy(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = ROOT / ".mypy_cache"
    if not writable(cache):
        cache = tmp_path_factory.mktemp("mypy-cache")
    run(tool("mypy"), "--cache-dir", os.fspath(cache))


def test_shellcheck() -> None:
    scripts = [ROOT / ".ci" / "setup", ROOT / ".ci" / "run", *sorted(ROOT.glob("tests/**/*.sh"))]
    run(tool("shellcheck"), *map(os.fspath, scripts))
