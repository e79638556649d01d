"""ruff, mypy (strict), import-linter (the wings' layer contract) and shellcheck as tests, so CI
enforces them; all configured in pyproject.toml.

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


def run(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def check(*argv: str) -> None:
    result = run(*argv)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout}{result.stderr}"


def writable(cache: Path) -> bool:
    return os.access(cache if cache.exists() else cache.parent, os.W_OK)


def test_ruff() -> None:
    # --no-cache: a checkout set up by root (sudo .ci/setup) has a cache others cannot write.
    check(tool("ruff"), "check", "--no-cache", "instance_cloudimage", "tests", "bench", "fuzz")


def test_mypy(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = ROOT / ".mypy_cache"
    if not writable(cache):
        cache = tmp_path_factory.mktemp("mypy-cache")
    check(tool("mypy"), "--cache-dir", os.fspath(cache))


def test_shellcheck() -> None:
    scripts = [*(ROOT / ".ci" / name for name in ("setup", "run", "build-deb", "check-package")),
               ROOT / "debian" / "ganeti-instance-cloudimage.postrm", *sorted(ROOT.glob("tests/**/*.sh")),
               ROOT / "fuzz" / "run.sh"]
    check(tool("shellcheck"), *map(os.fspath, scripts))


def test_import_contracts() -> None:
    check(tool("lint-imports"), "--no-cache")


def lint_copy(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess[str]:
    """lint-imports on a copy of the package with ``line`` added to ``module``."""
    shutil.copytree(ROOT / "instance_cloudimage", tmp_path / "instance_cloudimage",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "instance_cloudimage" / module
    target.write_text(target.read_text() + line + "\n")
    return run(tool("lint-imports"), "--no-cache", cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.fspath(tmp_path)})


# Every higher wing uses the lower ones, so a back-import between wings also closes a cycle.
@pytest.mark.parametrize(("module", "line", "broken"), [
    # A lower wing importing a higher one, even inside a function.
    ("image/detect.py", "def _f() -> None:\n    from instance_cloudimage.ganeti import env  # noqa",
     {"layered", "cycles"}),
    # The two sibling wings.
    ("seed/content.py", "from instance_cloudimage.sources import cache  # noqa", {"layered", "siblings"}),
    # A cycle inside one wing, hidden under TYPE_CHECKING.
    ("image/formats.py", "from typing import TYPE_CHECKING as _TC  # noqa\nif _TC:\n"
                         "    from instance_cloudimage.image import detect  # noqa", {"cycles"}),
])
def test_import_contracts_fail_on_a_back_import(tmp_path: Path, module: str, line: str, broken: set[str]) -> None:
    result = lint_copy(tmp_path, module, line)
    assert result.returncode != 0, result.stdout
    verdicts = [v for v in result.stdout.splitlines() if v.endswith((" KEPT", " BROKEN"))]
    assert len(verdicts) == 3, result.stdout
    assert [v.endswith("BROKEN") for v in verdicts] == [any(w in v for w in broken) for v in verdicts], result.stdout
