"""hostname, password_hash, DNS and the seeding parameters in params.PARAMETERS."""

from __future__ import annotations

import subprocess

import pytest

from instance_cloudimage.params.table import PARAMETERS, render_parameters_list, validate_parameters
from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.values import (
    HostName,
    parse_hostname,
    parse_nameservers,
    parse_password_hash,
    parse_search,
)
from tests.conftest import need_tools

# Real hashes: yescrypt/gost-yescrypt/scrypt/bcrypt made with libxcrypt (crypt(3)) for "pw".
YESCRYPT = "$y$j9T$F31F/jItUvvjOv6IBFNea/$SFRtZtCIUWcnypijZA5cTGTLcjo306tI.KLnmc0noD1"
GOST = "$gy$j9T$F31F/jItUvvjOv6IBFNea/$RltPuzWBGoMRxWBD8WIpP/DTrsGcXEI0iWQ2cG0VMv3"
SCRYPT = "$7$CU..../....abcdefghijklmnopqrstuv$gnW8UBCwYmDkf0L9kmjoB9fRzpU8lzi2WqTumIGSKk0"
BCRYPT = "$2b$10$abcdefghijklmnopqrstuuj7m4XYqbm74SxoBcXyw8to0CQ061DVG"


@pytest.mark.parametrize("value,expected", [
    ("web", HostName("web", None)),
    ("inst1.example.test", HostName("inst1", "inst1.example.test")),
    ("inst1.example.test.", HostName("inst1", "inst1.example.test")),
    ("1host.example", HostName("1host", "1host.example")),
    ("a" * 63, HostName("a" * 63, None)),
])
def test_valid_hostnames(value: str, expected: HostName) -> None:
    assert parse_hostname(value) == expected


@pytest.mark.parametrize("value", ["", "under_score", "-lead", "trail-.example", "a" * 64, "x..y",
                                   "192.0.2.1", ".".join(["a" * 60] * 5), "spa ce", "ümlaut"])
def test_invalid_hostnames(value: str) -> None:
    with pytest.raises(ParameterError) as e:
        parse_hostname(value)
    assert str(e.value).startswith("hostname")
    if value.strip():
        assert value not in str(e.value)


def _openssl(kind: str) -> str:
    need_tools("openssl")
    return subprocess.run(["openssl", "passwd", kind, "pw"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_password_hashes_of_every_modern_kind() -> None:
    for h in (YESCRYPT, GOST, SCRYPT, BCRYPT, _openssl("-6"), _openssl("-5"),
              "$6$rounds=5000$saltsalt$" + "a" * 86):
        assert parse_password_hash(h) == h


@pytest.mark.parametrize("value,why", [
    ("correct horse battery staple", "not a crypt"),
    ("$1$abc$abcdefghijklmnopqrstuv", "MD5"),
    ("abJnggxhB/yWI", "not a crypt"),          # DES crypt
    ("!" + YESCRYPT, "not a crypt"),             # a locked hash
    (YESCRYPT + ":x", "not a crypt"),
    ("$6$salt$short", "not a crypt"),
])
def test_password_hash_refuses_plain_text_and_weak_hashes(value: str, why: str) -> None:
    with pytest.raises(ParameterError, match=why) as e:
        parse_password_hash(value)
    assert value not in str(e.value) and "horse" not in str(e.value)


def test_dns_lists() -> None:
    assert parse_nameservers("192.0.2.53, 2001:db8::53 192.0.2.53") == ("192.0.2.53", "2001:db8::53")
    assert parse_nameservers("") == ()
    assert parse_search("example.test corp.example.") == ("example.test", "corp.example")
    with pytest.raises(ParameterError, match="dns_nameservers: entry 2"):
        parse_nameservers("192.0.2.53 ns.example")
    with pytest.raises(ParameterError, match="dns_search: entry 1"):
        parse_search("bad_domain")
    with pytest.raises(ParameterError, match="at most 6"):
        parse_search(" ".join(f"d{i}.example" for i in range(7)))


def test_seeding_parameters_are_declared_and_secret_where_needed() -> None:
    by_name = {p.name: p for p in PARAMETERS}
    for name in ("ssh_authorized_keys", "user_data", "hostname", "password_hash", "dns_nameservers",
                 "dns_search", "network", "seed"):
        assert name in by_name
        assert f"\n{name} " in "\n" + render_parameters_list()
    assert {n for n, p in by_name.items() if p.secret} >= {"password_hash", "user_data"}
    assert not by_name["ssh_authorized_keys"].secret


def test_validate_parameters_reports_without_values() -> None:
    params = {"hostname": "bad_name", "password_hash": "hunter2", "network": "static", "seed": "floppy",
              "dns_nameservers": "nameserver1", "user_data": "#cloud-config\nfoo: [unclosed",
              "ssh_authorized_keys": "ssh-rsa hunter2"}
    problems = validate_parameters(params, SiteConfig())
    assert len(problems) == len(params)
    text = "\n".join(problems)
    for word in ("bad_name", "hunter2", "static", "floppy", "nameserver1", "unclosed"):
        assert word not in text
    ok = {"hostname": "web.example", "password_hash": YESCRYPT, "network": "dhcp", "seed": "nocloud-disk",
          "dns_nameservers": "192.0.2.53", "dns_search": "example", "user_data": "#!/bin/sh\ntrue\n"}
    assert validate_parameters(ok, SiteConfig()) == []
