"""Local image paths: allowed directories only, no '..', no symlink escape (image-safety.md §A.1)."""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType

import pytest

from instance_cloudimage.config import SITE_SETTINGS, Paths, SiteConfig
from instance_cloudimage.errors import ParameterError
from instance_cloudimage.localpath import open_local_image, resolve_local_image_path


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "good.raw").write_bytes(b"disk")
    return d


@pytest.fixture
def site(tmp_path: Path, allowed: Path) -> SiteConfig:
    values = {s.dest: s.default for s in SITE_SETTINGS}
    values["allowed_dirs"] = (os.fspath(allowed),)
    return SiteConfig(paths=Paths(tmp_path / "etc", tmp_path / "cache"), values=MappingProxyType(values))


def test_a_file_in_an_allowed_directory(site: SiteConfig, allowed: Path) -> None:
    path = resolve_local_image_path(os.fspath(allowed / "good.raw"), site)
    assert path == allowed / "good.raw"
    os.close(open_local_image(path))


def test_dotdot_is_refused_even_when_it_resolves_inside(site: SiteConfig, allowed: Path) -> None:
    (allowed / "sub").mkdir()
    with pytest.raises(ParameterError, match="must not contain '..'"):
        resolve_local_image_path(f"{allowed}/sub/../good.raw", site)
    with pytest.raises(ParameterError, match="must not contain '..'"):
        resolve_local_image_path(f"{allowed}/../secret", site)


def test_symlink_escaping_the_allowed_directory(site: SiteConfig, allowed: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"host data")
    (allowed / "link.raw").symlink_to(secret)
    (allowed / "dirlink").symlink_to(tmp_path)
    for path in (allowed / "link.raw", allowed / "dirlink" / "secret"):
        with pytest.raises(ParameterError, match="outside the allowed image directories"):
            resolve_local_image_path(os.fspath(path), site)


def test_symlink_into_a_forbidden_root(site: SiteConfig, allowed: Path) -> None:
    (allowed / "hostname.raw").symlink_to("/etc/hostname")
    with pytest.raises(ParameterError, match="points into /etc"):
        resolve_local_image_path(os.fspath(allowed / "hostname.raw"), site)


def test_symlink_inside_the_allowed_directory_is_followed(site: SiteConfig, allowed: Path) -> None:
    (allowed / "alias.raw").symlink_to(allowed / "good.raw")
    assert resolve_local_image_path(os.fspath(allowed / "alias.raw"), site) == allowed / "good.raw"


def test_not_a_regular_file(site: SiteConfig, allowed: Path) -> None:
    os.mkfifo(allowed / "fifo.raw")
    with pytest.raises(ParameterError, match="not a regular file"):
        resolve_local_image_path(os.fspath(allowed / "fifo.raw"), site)
    with pytest.raises(ParameterError, match="must be absolute"):
        resolve_local_image_path("images/good.raw", site)


def test_open_refuses_a_symlink_swapped_in_after_the_check(allowed: Path, tmp_path: Path) -> None:
    checked = allowed / "good.raw"
    checked.unlink()
    checked.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ParameterError, match="cannot be opened"):
        open_local_image(checked)
