"""The address policy for URLs from the image parameter (unit tests, no network)."""

from __future__ import annotations

import ipaddress

import pytest

from instance_cloudimage.runtime.errors import ImageFetchError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.sources.mirrors import candidate_urls
from instance_cloudimage.sources.urlpolicy import (
    UrlPolicy,
    check_peer,
    check_url,
    is_public_address,
    parse_host,
    redact_url,
)

USER = UrlPolicy(restricted=True)


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "127.0.0.01", "0x7f.0.0.1",
                                  "1.2.3", "00.1.2.3"])
def test_non_canonical_numeric_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError):
        parse_host(host)


def test_canonical_forms() -> None:
    assert parse_host("93.184.216.34") == ipaddress.IPv4Address("93.184.216.34")
    assert parse_host("2001:db8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert parse_host("cloud.debian.org") is None
    assert parse_host("1e100.net") is None


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                  "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "fe80::1", "fd00::1",
                                  "::ffff:127.0.0.1", "2002:7f00:1::", "64:ff9b::a9fe:a9fe"])
def test_inward_addresses_are_not_public(addr: str) -> None:
    assert not is_public_address(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ["93.184.216.34", "2a00:1450:4001::1", "::ffff:8.8.8.8"])
def test_public_addresses(addr: str) -> None:
    assert is_public_address(ipaddress.ip_address(addr))


def test_check_url_for_the_image_parameter() -> None:
    with pytest.raises(ImageFetchError, match="reaches a link-local address") as e:
        check_url("http://169.254.169.254/latest/meta-data/", USER)
    assert "169.254" not in str(e.value)
    with pytest.raises(ImageFetchError, match="'gopher:'"):
        check_url("gopher://example.org/", USER, hop=1)
    with pytest.raises(ImageFetchError, match="zone"):
        check_url("http://[fe80::1%25eth0]/", USER)
    check_url("https://cloud.debian.org/images/x.qcow2", USER)
    check_url("http://10.0.0.1/x", UrlPolicy())  # an administrator's URL is not restricted


def test_allowlists() -> None:
    nets = UrlPolicy(restricted=True, allowed_networks=(ipaddress.ip_network("10.1.0.0/16"),))
    check_url("http://10.1.2.3/x", nets)
    with pytest.raises(ImageFetchError):
        check_url("http://10.2.0.1/x", nets)
    hosts = UrlPolicy(restricted=True, allowed_hosts=(".images.example.org", "mirror.local"))
    check_peer("a.images.example.org", "10.0.0.5", hosts)
    check_peer("mirror.local", "192.168.0.1", hosts)
    with pytest.raises(ImageFetchError):
        check_peer("evil.example.org", "10.0.0.5", hosts)
    check_url("http://127.0.0.1/x", UrlPolicy(restricted=True, allow_private=True))


def test_redact_url_drops_credentials() -> None:
    assert redact_url("https://u:secret@host.example:8443/p?q") == "https://host.example:8443/p?q"


def test_mirror_candidates_longest_prefix_first_then_upstream() -> None:
    site = SiteConfig(mirrors=(("https://cloud.debian.org/", "http://m1/ http://m2/"),
                               ("https://cloud.debian.org/images/cloud/", "http://m3/dc/")))
    urls = [(c.url, c.mirror) for c in candidate_urls("https://cloud.debian.org/images/cloud/x.qcow2", site)]
    assert urls == [("http://m3/dc/x.qcow2", True), ("https://cloud.debian.org/images/cloud/x.qcow2", False)]
    assert [c.url for c in candidate_urls("https://other/x", site)] == ["https://other/x"]


@pytest.mark.parametrize("host", ["secret:zz", "1::secret", "a:b"])
def test_a_malformed_ipv6_host_is_refused_without_quoting_it(host: str) -> None:
    # Older Pythons (Debian's 3.11.2) let such hosts through urlsplit; ipaddress quotes them.
    with pytest.raises(ValueError) as e:
        parse_host(host)
    assert "secret" not in str(e.value) and host not in str(e.value)


@pytest.mark.parametrize("rest", ["../../admin/secret", "a/../../../admin", "%2e%2e/%2E%2e/admin", ".%2e/x",
                                  "..%2fadmin", "..\\admin", "./../x", "a/..", "x/./y"])
def test_dot_segments_never_leave_a_mirror_prefix(rest: str) -> None:
    # The image parameter may match a mirror prefix, and mirrors are fetched without the address
    # policy: '..' (which urllib3 and web servers resolve) must not reach the rest of the mirror host.
    site = SiteConfig(mirrors=(("https://cloud.debian.org/images/cloud/", "http://mirror.local/debian-cloud/"),))
    url = "https://cloud.debian.org/images/cloud/" + rest
    assert [(c.url, c.mirror) for c in candidate_urls(url, site)] == [(url, False)]


def test_dots_inside_names_still_use_the_mirror() -> None:
    site = SiteConfig(mirrors=(("https://cloud.debian.org/images/cloud/", "http://mirror.local/dc/"),))
    urls = [c.url for c in candidate_urls("https://cloud.debian.org/images/cloud/a..b/x.y.qcow2", site)]
    assert urls[0] == "http://mirror.local/dc/a..b/x.y.qcow2"
