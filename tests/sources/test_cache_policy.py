"""A digest is no permission: the image parameter's URL passes the URL policy before the cache
answers it by digest (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import ImageFetchError
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig, load_site_config
from instance_cloudimage.sources.fetch import ImageRef, fetch_image
from tests.support.httpfixtures import ServerState, write_site

pytestmark = pytest.mark.integration

SITE_IMAGE = b"QFI\xfb" + b"only the site may have this" * 200
DIGEST = "sha256:" + hashlib.sha256(SITE_IMAGE).hexdigest()


def site_for(tmp_path: Path, images: dict[str, str]) -> SiteConfig:
    cfg = write_site(tmp_path / "etc", {"Images": {"AllowPrivateURLs": "no", **images}})
    return load_site_config(Paths(cfg, tmp_path / "cache"))


def fetch(ref: ImageRef, site: SiteConfig) -> bytes:
    with ExitStack() as stack:
        return fetch_image(ref, site, stack).path.read_bytes()


def cache_the_site_image(state: ServerState, site: SiteConfig) -> None:
    """The administrator's variant fetches an image from inside the site; it is cached."""
    state.files["/site.qcow2"] = SITE_IMAGE
    ref = ImageRef(location=state.url("/site.qcow2"), declared_format="auto", checksum=DIGEST, variant="site")
    assert fetch(ref, site) == SITE_IMAGE
    assert len(state.log) == 1


def param(url: str) -> ImageRef:
    return ImageRef(location=url, declared_format="auto", checksum=DIGEST, from_parameter=True)


@pytest.mark.parametrize(("url", "refusal"), [
    ("https://nonexistent.invalid/x", "cannot resolve the host name of the URL given by the image parameter"),
    ("http://127.0.0.1:{port}/x", "the URL given by the image parameter reaches a loopback address"),
    ("http://localhost:{port}/x", "the URL given by the image parameter reaches a loopback address"),
    ("http://10.0.0.1/x", "the URL given by the image parameter reaches a private address"),
])
def test_a_known_digest_does_not_serve_a_cached_image_to_a_refused_url(tmp_path: Path, state: ServerState,
                                                                      url: str, refusal: str) -> None:
    site = site_for(tmp_path, {})
    cache_the_site_image(state, site)
    url = url.format(port=state.base.rsplit(":", 1)[1])
    with pytest.raises(ImageFetchError, match=refusal) as e:
        fetch(param(url), site)
    assert "\n" not in e.value.message
    for value in (url, DIGEST, DIGEST[7:], "nonexistent", "127.0.0.1", "localhost", "10.0.0.1"):
        assert value not in str(e.value)
    assert len(state.log) == 1  # nothing more reached the server


def test_a_url_the_policy_allows_is_answered_from_the_cache(tmp_path: Path, state: ServerState) -> None:
    site = site_for(tmp_path, {"AllowedURLNetworks": "127.0.0.1/32"})
    cache_the_site_image(state, site)
    assert fetch(param(state.url("/anything.qcow2")), site) == SITE_IMAGE
    assert len(state.log) == 1  # no request for the image at all
