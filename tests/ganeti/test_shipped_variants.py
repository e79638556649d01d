"""Every shipped distribution variant names a verifiable image for each architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from instance_cloudimage.ganeti.variants import list_variants, load_variant
from instance_cloudimage.runtime.siteconfig import Paths
from instance_cloudimage.sources.fetch import resolve_image

PATHS = Paths(Path("/nonexistent/config"), Path("/nonexistent/cache"))
DISTROS = [v for v in list_variants(PATHS) if v != "demo"]


def test_the_current_releases_are_shipped() -> None:
    for name in ("debian-12", "debian-13", "ubuntu-24.04", "ubuntu-26.04", "fedora-44", "almalinux-9",
                 "almalinux-10", "rocky-9", "rocky-10", "centos-stream-9", "centos-stream-10",
                 "opensuse-leap-16.0"):
        assert name in DISTROS


@pytest.mark.parametrize("name", DISTROS)
def test_variant_resolves_to_https_with_a_checksum_source(name: str) -> None:
    variant = load_variant(name, PATHS)
    for arch in variant.architectures:
        ref = resolve_image(variant, {}, arch)
        assert ref.location.startswith("https://")
        assert ref.checksum or (ref.checksum_url or "").startswith("https://")
        assert "{arch}" not in ref.location and "{arch}" not in (ref.checksum_url or "")
        assert ("{name}" in ref.location) == bool(ref.name_pattern)
        assert ref.variant == name and not ref.from_parameter
