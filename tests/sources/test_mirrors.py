"""Mirror prefixes: exact origin and path-boundary matching (unit), and the policy a mirror of
the image parameter's URL is fetched under (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import ConfigError, ImageFetchError
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig, load_site_config
from instance_cloudimage.sources.fetch import ImageRef, fetch_image
from instance_cloudimage.sources.mirrors import candidate_urls
from instance_cloudimage.sources.urlpolicy import UrlPolicy, check_url, origin_of
from tests.support.httpfixtures import Server, ServerState, write_site

MIRROR = "http://mirror.local/m/"


def mirrored(prefix: str, url: str, target: str = MIRROR) -> str | None:
    """The mirror candidate for ``url`` under ``[Mirrors] prefix = target``, or None."""
    cands = candidate_urls(url, SiteConfig(mirrors=((prefix, target),)))
    assert cands[-1].url == url and not cands[-1].mirror
    return cands[0].url if cands[0].mirror else None


@pytest.mark.parametrize(("prefix", "url", "expected"), [
    # scheme, host and port exactly; default ports normalised
    ("https://images.example.org", "https://images.example.org/x", "http://mirror.local/m//x"),
    ("https://images.example.org/", "https://images.example.org:443/x", "http://mirror.local/m/x"),
    ("https://images.example.org:443/", "https://images.example.org/x", "http://mirror.local/m/x"),
    ("http://images.example.org/", "http://images.example.org:80/x", "http://mirror.local/m/x"),
    ("https://images.example.org/", "https://IMAGES.Example.org/x", "http://mirror.local/m/x"),
    ("https://images.example.org/", "https://images.example.org./x", "http://mirror.local/m/x"),
    ("https://[2001:db8::1]:8443/", "https://[2001:DB8::1]:8443/x", "http://mirror.local/m/x"),
    # the path at a '/' boundary
    ("https://h/debian", "https://h/debian/x", "http://mirror.local/m//x"),
    ("https://h/debian", "https://h/debian", "http://mirror.local/m/"),
    ("https://h/debian/", "https://h/debian/x/y.qcow2?v=1", "http://mirror.local/m/x/y.qcow2?v=1"),
    ("https://h/debian/", "https://h/debian/", "http://mirror.local/m/"),
    ("https://h/", "https://h", "http://mirror.local/m/"),
])
def test_matching_urls(prefix: str, url: str, expected: str) -> None:
    assert mirrored(prefix, url) == expected


@pytest.mark.parametrize(("prefix", "url"), [
    ("https://images.example.org", "https://images.example.org:18932/internal/x"),  # another port
    ("https://images.example.org", "https://images.example.org.evil.net/"),  # another host
    ("https://images.example.org", "https://images.example.org@evil.net/"),  # user info, another host
    ("https://images.example.org", "https://user@images.example.org/x"),  # user info
    ("https://images.example.org/", "https://images.example.org:443@evil.net/x"),
    ("https://images.example.org/", "http://images.example.org/x"),  # another scheme
    ("https://images.example.org/", "http://images.example.org:443/x"),
    ("http://images.example.org/", "https://images.example.org:80/x"),
    ("https://images.example.org:8443/", "https://images.example.org/x"),
    ("https://images.example.org/", "https://images.example.org:99999/x"),  # invalid port
    ("https://h/debian", "https://h/debian-evil/x"),  # the path continues past the boundary
    ("https://h/debian", "https://h/debianx"),
    ("https://h/debian", "https://h/Debian/x"),
    ("https://h/debian", "https://h/debian%2fx"),
    ("https://h/debian/", "https://h/debian"),
    ("https://h/debian/", "https://h//debian/x"),
    ("https://h/debian/", "https://h/x/debian/y"),
    ("https://h/debian/", "https://hx/debian/y"),
    ("https://h/debian/", "ftp://h/debian/y"),
])
def test_urls_that_do_not_match(prefix: str, url: str) -> None:
    assert mirrored(prefix, url) is None


@pytest.mark.parametrize("target", ["http://127.0.0.1", "http://127.0.0.1:8080", "http://m.local/dc"])
def test_a_candidate_stays_on_its_mirror(target: str) -> None:
    # The rest of the URL can never name another host or port, whatever the mirror prefix ends with.
    for prefix, url in [("https://images.example.org", "https://images.example.org/x/y"),
                        ("https://images.example.org/", "https://images.example.org/.evil.net/x"),
                        ("https://images.example.org/", "https://images.example.org/:18932/x"),
                        ("https://images.example.org/", "https://images.example.org/@evil.net/x")]:
        cand = candidate_urls(url, SiteConfig(mirrors=((prefix, target),)))[0]
        assert cand.mirror and origin_of(cand.url) == origin_of(target) == cand.origin, (prefix, url)


def test_longest_matching_prefix_wins_by_path() -> None:
    site = SiteConfig(mirrors=(("https://h/", "http://m1/"), ("https://h/debian/", "http://m2/"),
                               ("https://h:8443/debian/cloud/", "http://m3/")))
    assert candidate_urls("https://h/debian/cloud/x", site)[0].url == "http://m2/cloud/x"
    assert candidate_urls("https://h/ubuntu/x", site)[0].url == "http://m1/ubuntu/x"
    assert candidate_urls("https://h:8443/debian/cloud/x", site)[0].url == "http://m3/x"


@pytest.mark.parametrize("prefix", ["images.example.org/", "ftp://h/", "https:///x", "https://h:99999/",
                                    "https://h/?a=1"])
def test_a_prefix_that_is_no_http_url_is_a_config_error(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"^\[Mirrors\] prefix .* is not an http\(s\) URL prefix") as e:
        candidate_urls("https://h/x", SiteConfig(mirrors=((prefix, MIRROR),)))
    assert "\n" not in e.value.message


def test_a_mirror_origin_is_trusted_only_by_its_own_policy() -> None:
    user = UrlPolicy(restricted=True)
    mirror = user.for_mirror(origin_of("http://127.0.0.1:8080/m/"))
    check_url("http://127.0.0.1:8080/m/x", mirror)
    check_url("http://127.0.0.1:8080/other", mirror, hop=1)  # the same origin, also after a redirect
    for url in ("http://127.0.0.1:8081/x", "http://127.0.0.1/x", "https://127.0.0.1:8080/x", "http://10.0.0.1/"):
        with pytest.raises(ImageFetchError, match="address, which the image parameter may not reach"):
            check_url(url, mirror, hop=1)
    with pytest.raises(ImageFetchError):
        check_url("http://127.0.0.1:8080/m/x", user)
    assert UrlPolicy().for_mirror(origin_of("http://10.0.0.1/")) == UrlPolicy()  # a variant's: unrestricted


# --- fetches through a configured mirror, with the address policy on -------------------------------

IMAGE = b"QFI\xfb" + bytes(4092)
PINNED = "sha256:" + hashlib.sha256(IMAGE).hexdigest()
SECRET = b"QFI\xfb" + b"secret" * 600
SECRET_PINNED = "sha256:" + hashlib.sha256(SECRET).hexdigest()


@pytest.fixture
def internal() -> Iterator[ServerState]:
    """A second server on loopback: something inside the site that the image parameter may not reach."""
    st = ServerState()
    srv = Server(st)
    yield st
    srv.stop()


def strict_site(tmp_path: Path, mirrors: dict[str, str]) -> SiteConfig:
    cfg = write_site(tmp_path / "etc", {"Images": {"AllowPrivateURLs": "no"}, "Mirrors": mirrors})
    return load_site_config(Paths(cfg, tmp_path / "cache"))


def fetch_param(url: str, site: SiteConfig, checksum: str | None = PINNED) -> bytes:
    ref = ImageRef(location=url, declared_format="auto", checksum=checksum, from_parameter=True)
    with ExitStack() as stack:
        return fetch_image(ref, site, stack).path.read_bytes()


def port_of(state: ServerState) -> str:
    return state.base.rsplit(":", 1)[1]


@pytest.mark.integration
def test_the_image_parameter_cannot_choose_the_mirror_port(tmp_path: Path, state: ServerState,
                                                           internal: ServerState) -> None:
    # [Mirrors] https://images.example.invalid = http://127.0.0.1: before, the rest of the user's
    # URL (':<port>/internal/…') was appended and reached any port of the mirror host.
    internal.files["/internal/secret.qcow2"] = SECRET
    site = strict_site(tmp_path, {"https://images.example.invalid": "http://127.0.0.1"})
    with pytest.raises(ImageFetchError) as e:
        fetch_param(f"https://images.example.invalid:{port_of(internal)}/internal/secret.qcow2", site,
                    SECRET_PINNED)
    assert internal.log == []
    assert "\n" not in e.value.message and "example.invalid" not in e.value.message


@pytest.mark.integration
def test_the_configured_mirror_may_be_private_but_not_its_redirects(tmp_path: Path, state: ServerState,
                                                                   internal: ServerState) -> None:
    state.files["/m/img.qcow2"] = IMAGE
    state.redirects["/m/jump.qcow2"] = internal.url("/secret.qcow2")
    internal.files["/secret.qcow2"] = SECRET
    site = strict_site(tmp_path, {"https://images.example.invalid/pub/": state.url("/m/")})
    # The site's own mirror host is trusted, although it is on loopback.
    assert fetch_param("https://images.example.invalid/pub/img.qcow2", site) == IMAGE
    assert len(state.body_gets("/m/img.qcow2")) == 1
    # Its redirect elsewhere is checked like any redirect of the user's URL; the upstream is tried last.
    with pytest.raises(ImageFetchError, match="cannot resolve the host name of the URL given by the image parameter"):
        fetch_param("https://images.example.invalid/pub/jump.qcow2", site, SECRET_PINNED)
    assert [r.path for r in state.log] == ["/m/img.qcow2", "/m/jump.qcow2"]
    assert internal.log == []


@pytest.mark.integration
def test_a_refused_mirror_redirect_is_one_line_without_the_url(tmp_path: Path, state: ServerState,
                                                              internal: ServerState,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    state.redirects["/m/jump.qcow2"] = internal.url("/secret.qcow2")
    internal.files["/secret.qcow2"] = SECRET
    site = strict_site(tmp_path, {"https://images.example.invalid/pub/": state.url("/m/")})
    with pytest.raises(ImageFetchError):
        fetch_param("https://images.example.invalid/pub/jump.qcow2", site, SECRET_PINNED)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0].startswith(f"a redirect of mirror {state.url('/m/')} for the URL given by the image "
                                  "parameter reaches a loopback address, which the image parameter may not reach")
    for line in warnings:
        assert "\n" not in line and "jump" not in line and "example.invalid" not in line
        assert internal.base not in line
    assert internal.log == []
