"""sources/trust.py: which images the site chose, and the [Images] settings that decide it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import ConfigError
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig, load_site_config
from instance_cloudimage.sources.trust import decide_trust, trust_of_parameters


def site_with(tmp_path: Path, text: str) -> SiteConfig:
    (tmp_path / "defaults.conf").write_text(text)
    return load_site_config(Paths(config_dir=tmp_path, cache_dir=tmp_path / "cache"))


def test_defaults_trust_only_the_variant(tmp_path: Path) -> None:
    site = SiteConfig()
    assert site.get("trusted_dirs") == () and site.get("mount_untrusted") is False
    variant = decide_trust(None, site)
    assert variant.trusted and variant.may_mount and variant.describe() == "trusted (named by the variant)"
    given = decide_trust("https://example.org/x.qcow2", site)
    assert not given.trusted and not given.may_mount
    assert given.describe() == ("untrusted (named by the image parameter); its filesystems are never mounted "
                                "on this node")
    assert not decide_trust("/var/lib/instance-cloudimage/images/x.img", site).trusted


@pytest.mark.parametrize("location", ["{d}/x.img", "file://{d}/x.img", "{d}/sub/x.img"])
def test_a_file_in_a_trusted_directory_is_trusted(tmp_path: Path, location: str) -> None:
    trusted = tmp_path / "golden"
    site = site_with(tmp_path, f"[Images]\nTrustedDirectories = {trusted}\n")
    got = decide_trust(location.format(d=trusted), site)
    assert got.trusted and "TrustedDirectories" in got.reason


def test_trusted_directory_is_decided_on_the_resolved_path(tmp_path: Path) -> None:
    trusted, other = tmp_path / "golden", tmp_path / "uploads"
    trusted.mkdir()
    other.mkdir()
    (other / "evil.img").write_bytes(b"")
    os.symlink(other / "evil.img", trusted / "looks-golden.img")
    site = site_with(tmp_path, f"[Images]\nTrustedDirectories = {trusted}\n")
    assert not decide_trust(os.fspath(trusted / "looks-golden.img"), site).trusted
    assert not decide_trust(os.fspath(trusted), site).trusted  # the directory itself is no image
    assert not decide_trust(f"{trusted}-not/x.img", site).trusted  # a prefix is not a parent
    assert not decide_trust(f"https://host{trusted}/x.img", site).trusted  # a URL's path is not a file


def test_site_may_trust_the_parameter_or_mount_untrusted_images(tmp_path: Path) -> None:
    site = site_with(tmp_path, "[Images]\nTrustImageParameter = yes\n")
    assert decide_trust("https://example.org/x.qcow2", site).trusted
    site = site_with(tmp_path, "[Images]\nMountUntrusted = yes\n")
    got = decide_trust("https://example.org/x.qcow2", site)
    assert not got.trusted and got.may_mount and "MountUntrusted = yes" in got.describe()


def test_trust_from_the_parameters(tmp_path: Path) -> None:
    site = SiteConfig()
    assert trust_of_parameters({}, site).trusted
    assert trust_of_parameters({"image": " "}, site).trusted
    assert not trust_of_parameters({"image": "https://example.org/x"}, site).trusted


def test_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[Images\] MountUntrusted is invalid"):
        site_with(tmp_path, "[Images]\nMountUntrusted = maybe\n")
