"""Variant files and the site configuration, parsed through their settings tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from instance_cloudimage.ganeti.variants import list_variants, load_variant
from instance_cloudimage.runtime.errors import ConfigError, ParameterError
from instance_cloudimage.runtime.siteconfig import Paths, load_site_config


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    (tmp_path / "etc" / "variants").mkdir(parents=True)
    return Paths(config_dir=tmp_path / "etc", cache_dir=tmp_path / "cache")


def write_site_variant(paths: Paths, name: str, text: str) -> Path:
    p = paths.site_variants / f"{name}.conf"
    p.write_text(text)
    return p


def test_every_shipped_variant_parses(paths: Paths) -> None:
    names = list_variants(paths)
    assert "demo" in names and "debian-12" in names
    for name in names:
        v = load_variant(name, paths)
        assert v.description
        for arch in v.architectures:
            spec = v.image_for(arch)
            assert "{arch}" not in spec.url
            assert spec.url.startswith(("https://", "builtin:")), spec.url


def test_arch_names_are_substituted(paths: Paths) -> None:
    v = load_variant("debian-12", paths)
    assert v.image_for("aarch64").url.endswith("debian-12-generic-arm64.qcow2")
    with pytest.raises(ParameterError, match="no image for architecture ppc64le"):
        v.image_for("ppc64le")


def test_site_variant_overrides_one_key_of_a_shipped_one(paths: Paths) -> None:
    write_site_variant(paths, "debian-12", "[Image]\nURL = https://mirror.example/debian-{arch}.qcow2\n")
    v = load_variant("debian-12", paths)
    assert v.image_for("x86_64").url == "https://mirror.example/debian-amd64.qcow2"
    assert v.agent == "cloud-init"  # from the shipped file


def test_per_architecture_keys(paths: Paths) -> None:
    sha = "a" * 64
    write_site_variant(paths, "local", f"""
[Variant]
Description = local image
Architectures = x86_64 aarch64
[Image]
URL = https://example.org/img-{{arch}}.raw
URL[aarch64] = https://example.org/special-arm.qcow2
Checksum[x86_64] = sha256:{sha}
""")
    v = load_variant("local", paths)
    assert v.image_for("x86_64").checksum == f"sha256:{sha}"
    assert v.image_for("aarch64").url == "https://example.org/special-arm.qcow2"
    assert v.image_for("aarch64").checksum is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[Image]\nURL = https://x/y\nColour = blue\n", "unknown setting [Image] Colour"),
        ("[Extra]\nFoo = 1\n", "unknown setting [Extra] Foo"),
        ("[Variant]\nAgent = systemd\n[Image]\nURL = https://x/y\n", "[Variant] Agent is invalid"),
        ("[Image]\nURL = https://x/y\nChecksum = md5:abc\n", "[Image] Checksum is invalid"),
        ("[Image]\nURL = https://x/y\nKeyring[x86_64] = k\n", "cannot be given per architecture"),
        ("[Variant]\nDescription = no image\n", "has no [Image] URL"),
        ("not an ini file\n", "is not a valid INI file"),
    ],
)
def test_bad_variant_files_are_config_errors(paths: Paths, text: str, message: str) -> None:
    write_site_variant(paths, "bad", text)
    with pytest.raises(ConfigError) as exc:
        load_variant("bad", paths)
    assert message in str(exc.value)
    assert exc.value.exit_code == 2


def test_unknown_and_malformed_variant_names_are_user_errors(paths: Paths) -> None:
    with pytest.raises(ParameterError, match="unknown variant 'nope'"):
        load_variant("nope", paths)
    with pytest.raises(ParameterError, match="malformed"):
        load_variant("../etc/passwd", paths)


def test_site_config_defaults_and_overrides(paths: Paths) -> None:
    assert load_site_config(paths).get("read_timeout") == 60.0
    paths.site_config.write_text(
        "[Images]\nAllowedDirectories = /srv/a, /srv/b\n[HTTP]\nReadTimeout = 5\n"
        "[Cache]\nMaxSize = 2G\n[Mirrors]\nhttps://cloud.debian.org/ = http://mirror.local/debian/\n"
    )
    site = load_site_config(paths)
    assert site.allowed_dirs == ("/srv/a", "/srv/b")
    assert site.get("read_timeout") == 5.0
    assert site.get("cache_max_size") == 2 * 1024**3
    assert site.mirrors == (("https://cloud.debian.org/", "http://mirror.local/debian/"),)
    paths.site_config.write_text("[HTTP]\nReadTimeout = -1\n")
    with pytest.raises(ConfigError, match="ReadTimeout is invalid"):
        load_site_config(paths)


@pytest.mark.parametrize("key", ["URL", "ChecksumURL", "SignatureURL"])
def test_a_malformed_url_in_a_variant_is_a_config_error(paths: Paths, key: str) -> None:
    url = "" if key == "URL" else "URL = https://example.org/x.img\n"
    write_site_variant(paths, "bad", f"[Image]\n{url}{key} = https://[zz/y\n")
    with pytest.raises(ConfigError, match=rf"\[Image\] {key} is invalid: Invalid IPv6 URL"):
        load_variant("bad", paths)


@pytest.mark.parametrize("value", ["nan", "inf", "1e309", "-inf"])
@pytest.mark.parametrize("key", ["[HTTP]\nConnectTimeout", "[HTTP]\nReadTimeout", "[HTTP]\nRetryBackoff",
                                 "[Hooks]\nTimeout"])
def test_site_durations_must_be_finite(paths: Paths, key: str, value: str) -> None:
    # NaN passed 'must be positive' (nan <= 0 is false) and a hook then "timed out after nans".
    paths.site_config.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError, match="is invalid: must be a positive number of seconds"):
        load_site_config(paths)
