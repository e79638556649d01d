"""Which URLs we may fetch: the SSRF policy (docs/images.md, "HTTP(S)").

A URL that comes from the user-controlled ``image`` parameter must not make this node (root,
inside the cluster's network) reach loopback, link-local (169.254.169.254 metadata), private,
shared, reserved or multicast addresses, unless the site allows them (``[Images]
AllowPrivateURLs``, ``AllowedURLHosts``, ``AllowedURLNetworks``).  The check runs on every
redirect hop and again on the address the socket actually connected to (DNS rebinding).
Variant URLs are written by the administrator and are not restricted, except that every hop
must be http(s).  A mirror of a URL from the image parameter is fetched under that URL's policy
with one exception: the mirror's own origin (scheme, host and port, as the site configured it)
is trusted, and a redirect to anywhere else is checked as usual.

Host names that merely *look* numeric (``2130706433``, ``0x7f000001``, ``127.1``, ``0177.0.0.1``)
are refused outright: resolvers disagree about them and they exist to slip past blocklists.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, replace
from urllib.parse import SplitResult, urlsplit

from instance_cloudimage.runtime.errors import ImageFetchError, ParameterError
from instance_cloudimage.runtime.siteconfig import SiteConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Origin = tuple[str, str, int]  # scheme, host, port; see origin_of
DEFAULT_PORTS = {"http": 80, "https": 443}

NUMERIC_LABEL_RE = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
HOSTNAME_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$", re.IGNORECASE)
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
PARAMETER_URL = "the URL given by the image parameter"


@dataclass(frozen=True)
class UrlPolicy:
    """``restricted`` is true for URLs from the image parameter."""

    restricted: bool = False
    allow_private: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[IPNetwork, ...] = field(default=())
    require_https: bool = False  # plain http only with a pinned checksum
    trusted_origins: tuple[Origin, ...] = ()  # a configured mirror's origin: the site's own choice

    def describe(self, url: str) -> str:
        """How a URL may appear in messages: never, when the user gave it (it may be private)."""
        return PARAMETER_URL if self.restricted else redact_url(url)

    def for_mirror(self, origin: Origin | None) -> UrlPolicy:
        """This policy for a configured mirror: its origin, and nothing else, is trusted."""
        if not self.restricted or origin is None:
            return self
        return replace(self, trusted_origins=(origin,))

    def trusts(self, origin: Origin | None) -> bool:
        return origin is not None and origin in self.trusted_origins

    def host_is_allowlisted(self, host: str) -> bool:
        h = host.lower().rstrip(".")
        for allowed in self.allowed_hosts:
            a = allowed.lower().rstrip(".")
            if a.startswith(".") and (h.endswith(a) or h == a[1:]):
                return True
            if h == a:
                return True
        return False

    def address_allowed(self, addr: IPAddress) -> bool:
        if not self.restricted or self.allow_private:
            return True
        if any(addr in net for net in self.allowed_networks if net.version == addr.version):
            return True
        return is_public_address(addr)


def origin_of(url: str) -> Origin | None:
    """(scheme, host, port) of an http(s) URL, default ports filled in; None if it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return make_origin(scheme, parts.hostname, port)


def make_origin(scheme: str, host: str, port: int | None) -> Origin:
    """The one spelling of an origin: host in lower case without a final dot, the default port filled in."""
    return scheme, host.lower().rstrip("."), port if port is not None else DEFAULT_PORTS[scheme]


def redact_url(url: str) -> str:
    """The URL without user:password@ (a variant may carry credentials)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def check_plain_http(url: str, pinned: bool, site: SiteConfig) -> None:
    """The image parameter's http:// URL needs a checksum the user gave, unless the site allows plain
    http.  Verify and create both apply it (params/request.py, sources/remote.py)."""
    if urlsplit(url).scheme.lower() == "http" and not pinned and not site.get("allow_plain_http"):
        raise ParameterError("an http:// image URL needs image_checksum (or use https://)",
                             "an administrator can allow it with [Images] AllowPlainHTTP")


def policy_for(restricted: bool, site: SiteConfig, *, pinned: bool = True) -> UrlPolicy:
    """The policy for a URL; ``pinned`` says whether a trusted checksum protects plain http."""
    if not restricted:
        return UrlPolicy()
    nets = []
    for text in site.get("allowed_url_networks"):
        nets.append(ipaddress.ip_network(text, strict=False))
    return UrlPolicy(restricted=True, allow_private=bool(site.get("allow_private_urls")),
                     allowed_hosts=tuple(site.get("allowed_url_hosts")), allowed_networks=tuple(nets),
                     require_https=not pinned and not site.get("allow_plain_http"))


def is_public_address(addr: IPAddress) -> bool:
    """Globally routable unicast, also looking inside IPv6 forms that embed an IPv4 address."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
    return addr.is_global and not addr.is_multicast


def parse_host(host: str) -> IPAddress | None:
    """The literal address in ``host``, None for a name; raises ValueError for odd spellings."""
    if ":" in host:
        if "%" in host:
            raise ValueError("IPv6 zone identifiers are not allowed")
        try:
            return ipaddress.IPv6Address(host)
        except ipaddress.AddressValueError:
            # Security: ipaddress quotes the text, and the URL may be private.
            raise ValueError("malformed IPv6 address") from None
    labels = host.rstrip(".").split(".")
    if all(NUMERIC_LABEL_RE.match(label) for label in labels):
        # Only the canonical dotted quad is accepted; ipaddress refuses leading zeros too.
        try:
            addr = ipaddress.IPv4Address(host)
        except ipaddress.AddressValueError:
            raise ValueError("non-canonical numeric host") from None
        if str(addr) != host:
            raise ValueError("non-canonical numeric host")
        return addr
    if not HOSTNAME_RE.match(host):
        raise ValueError("malformed host name")
    return None


def check_url(url: str, policy: UrlPolicy, *, hop: int = 0, source: str | None = None) -> SplitResult:
    """Validate one URL (a first request or a redirect target).  Raises ImageFetchError.

    ``source`` names the first URL of a redirect chain in messages (safe to print).
    """
    if hop == 0:
        what = policy.describe(url)
    else:
        what = f"a redirect of {source or PARAMETER_URL}" if policy.restricted else f"the redirect to {redact_url(url)}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ImageFetchError(f"{what} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if policy.trusts(origin_of(url)):
        return parts
    if scheme not in ("http", "https"):
        shown = scheme if scheme.isalnum() else "unknown"
        raise ImageFetchError(f"{what} leads to a '{shown}:' URL; only http and https are followed")
    if scheme == "http" and policy.require_https:
        raise ImageFetchError(f"{what} leads to a plain http URL, which needs image_checksum",
                              "an administrator can allow it with [Images] AllowPlainHTTP")
    host = parts.hostname
    if not host:
        raise ImageFetchError(f"{what} has no host")
    try:
        addr = parse_host(host)
    except ValueError as e:
        raise ImageFetchError(f"{what} has a refused host ({e})",
                              "write IPv4 addresses as four decimal numbers") from None
    if addr is not None and not policy.host_is_allowlisted(host) and not policy.address_allowed(addr):
        raise refused(what, addr)
    return parts


def refused(what: str, addr: IPAddress) -> ImageFetchError:
    return ImageFetchError(
        f"{what} reaches a {classify(addr)} address, which the image parameter may not reach",
        "an administrator can allow it with [Images] AllowPrivateURLs, AllowedURLHosts or "
        "AllowedURLNetworks in the site configuration")


def classify(addr: IPAddress) -> str:
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_private:
        return "private"
    return "reserved"


def check_peer(host: str, peer_ip: str, policy: UrlPolicy, origin: Origin | None = None) -> None:
    """Run on the socket's real peer address, after DNS: catches names that resolve inward."""
    if not policy.restricted or policy.host_is_allowlisted(host) or policy.trusts(origin):
        return
    addr = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    if not policy.address_allowed(addr):
        raise refused(PARAMETER_URL, addr)


def check_resolved(host: str, policy: UrlPolicy, origin: Origin | None = None) -> None:
    """Best effort for proxied requests (the proxy resolves): every address we see must pass."""
    if not policy.restricted or policy.host_is_allowlisted(host) or policy.trusts(origin):
        return
    for address in resolve(host) or ():  # None: the proxy may know names this node does not
        check_peer(host, address, policy)


def resolve(host: str) -> list[str] | None:
    """The addresses this node resolves ``host`` to; None when it resolves to none."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    return [str(info[4][0]) for info in infos] or None


def may_use_cache(url: str, policy: UrlPolicy) -> bool:
    """Whether ``url`` may be answered from the cache by a known digest, before any request.

    A digest is no permission: a URL from the image parameter gets a cached image only if the
    policy would let it be fetched.  Raises the policy's refusal; False when the host name does
    not resolve here (the request then decides, perhaps through the proxy).
    """
    parts = check_url(url, policy)
    if not policy.restricted:
        return True
    host = parts.hostname or ""
    if parse_host(host) is not None:
        return True  # a literal address: check_url has judged it
    addresses = resolve(host)
    for address in addresses or ():
        check_peer(host, address, policy)
    return addresses is not None
