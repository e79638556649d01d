"""shipped_dir: the installed package's data directories first, the checkout's otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from instance_cloudimage.runtime import resources


def test_checkout_finds_the_top_level_directories() -> None:
    root = Path(resources.__file__).resolve().parents[2]
    assert resources.shipped_dir("variants") == root / "variants"
    assert (resources.shipped_dir("variants") / "demo.conf").is_file()
    assert (resources.shipped_dir("scripts") / "create").is_file()


def test_installed_layout_wins_over_a_sibling_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # site-packages/instance_cloudimage/shipped_variants beside an unrelated site-packages/variants
    package = tmp_path / "site-packages" / "instance_cloudimage"
    (package / "shipped_variants").mkdir(parents=True)
    (tmp_path / "site-packages" / "variants").mkdir()
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    assert resources.shipped_dir("variants") == package / "shipped_variants"
