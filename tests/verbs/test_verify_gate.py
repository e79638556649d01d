"""Verify is the gate: whatever create refuses from the parameters, the variant and this node, verify
has already refused, with the same line (params/request.py).  The bad values are generated from
each parameter's declaration, not picked by hand."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.env import Script, parse_environment
from instance_cloudimage.ganeti.simulate import simulated_core_environment, simulated_environment
from instance_cloudimage.ganeti.variants import host_architecture
from instance_cloudimage.params.table import PARAMETERS, Text, parameter_names
from instance_cloudimage.runtime.errors import UserError
from instance_cloudimage.runtime.siteconfig import Paths, load_site_config
from instance_cloudimage.verbs.create import prepare
from instance_cloudimage.verbs.verify import run_verify
from tests.conftest import Site

# One valid value per parameter; the test below fails when a parameter is added without one.
VALID = {
    "image": "https://images.example.org/disk.qcow2",
    "image_checksum": "sha256:" + "ab" * 32,
    "arch": host_architecture(),
    "grow_root": "no",  # yes is refused for the untrusted image above (below)
    "hostname": "vm1.example.org",
    "ssh_authorized_keys": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM2ziK4RM0utYUnNU57yaVLln5aVvIYlUM/oaMR+Tcc1 a@b",
    "password_hash": "$y$j9T$F31F/jItUvvjOv6IBFNea/$SFRtZtCIUWcnypijZA5cTGTLcjo306tI.KLnmc0noD1",
    "user_data": "#cloud-config\npackages: [htop]\n",
    "dns_nameservers": "192.0.2.53 2001:db8::53",
    "dns_search": "example.org",
    "network": "dhcp",
    "seed": "auto",
    "keep_instance_id": "no",
    "metad_refresh": "yes",
}
CONTROLS = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))] + ["\u2028", "\u2029"]
ALLOWED = {Text.LINE: "", Text.LINES: "\n\r", Text.ANY: "".join(CONTROLS)}
PADS = (" ", "\t", "\u00a0", "\u3000")


def hostile_values() -> Iterator[tuple[str, str]]:
    """Each parameter's valid value spoiled by every character its format has no place for, in the
    middle and at each end, and by white space around a one-line value."""
    for p in PARAMETERS:
        good = VALID[p.name]
        middle = len(good) // 2
        for char in CONTROLS:
            if char not in ALLOWED[p.text]:
                yield p.name, good[:middle] + char + good[middle:]
                yield p.name, good + char
        if p.text is Text.LINE:
            for pad in PADS:
                yield p.name, pad + good
                yield p.name, good + pad


def verdicts(site: Site, tmp_path: Path, variant: str, params: Mapping[str, str]) -> tuple[str | None, str | None]:
    """What verify and create's checks before any download say: None for a pass, else the line."""
    paths = Paths(site.config_dir, site.cache_dir)
    said: list[str | None] = []
    try:
        run_verify(parse_environment(simulated_core_environment(variant, params=params), Script.VERIFY), paths,
                   ["parameters"])
        said.append(None)
    except UserError as e:
        said.append(str(e))
    disk = tmp_path / "disk.img"
    disk.touch()
    env = simulated_environment(variant, [disk], nics=1, params=params)
    try:
        prepare(parse_environment(env, Script.CREATE), load_site_config(paths))
        said.append(None)
    except UserError as e:
        said.append(str(e))
    return said[0], said[1]


def test_every_parameter_has_a_valid_value_here() -> None:
    assert sorted(VALID) == sorted(parameter_names())


def test_the_valid_values_pass_both(site: Site, tmp_path: Path) -> None:
    assert verdicts(site, tmp_path, "debian-12", VALID) == (None, None)


def test_a_choice_an_untrusted_image_cannot_have_gets_the_same_line(site: Site, tmp_path: Path) -> None:
    said = verdicts(site, tmp_path, "debian-12", {**VALID, "grow_root": "yes"})
    assert said[0] == said[1] and said[0] is not None
    assert said[0].startswith("grow_root=yes grows the image's filesystem on this node")


def test_every_hostile_value_gets_the_same_line_from_verify_and_create(site: Site, tmp_path: Path) -> None:
    checked = 0
    for name, value in hostile_values():
        params = VALID | {name: value}
        verify_says, create_says = verdicts(site, tmp_path, "debian-12", params)
        assert verify_says is not None, (name, repr(value))
        assert verify_says == create_says, (name, repr(value))
        assert name in verify_says
        if len(VALID[name]) >= 8:  # shorter values ("no", "dhcp") are words of the message itself
            assert VALID[name] not in verify_says
        checked += 1
    assert checked > len(PARAMETERS) * len(CONTROLS)


@pytest.fixture
def elsewhere(site: Site) -> str:
    """A site variant with an image for an architecture this node is not."""
    other = "riscv64" if host_architecture() != "riscv64" else "x86_64"
    site.config_dir.joinpath("variants").mkdir(exist_ok=True)
    site.config_dir.joinpath("variants", "elsewhere.conf").write_text(
        f"[Variant]\nDescription = elsewhere\nAgent = cloud-init\nArchitectures = {other}\n\n"
        "[Image]\nURL = https://images.example.org/x.qcow2\nFormat = qcow2\n")
    return "elsewhere"


@pytest.mark.parametrize(("variant", "params", "expected"), [
    # The rules that join two parameters, or a parameter and the variant or this node.
    ("debian-12", {"image": "http://images.example.org/x.img"}, "an http:// image URL needs image_checksum"),
    ("demo", {"password_hash": VALID["password_hash"]}, "does not name its image's default user"),
    ("debian-12", {"arch": "s390x"}, "has no image for architecture s390x"),
    ("elsewhere", {}, "has no image for architecture " + host_architecture()),
    ("nosuch", {}, "unknown variant 'nosuch'"),
], ids=["plain-http-without-checksum", "password-without-default-user", "arch-parameter", "node-arch",
        "unknown-variant"])
def test_rules_across_parameters_are_checked_by_verify_as_by_create(
        site: Site, tmp_path: Path, elsewhere: str, variant: str, params: dict[str, str], expected: str) -> None:
    verify_says, create_says = verdicts(site, tmp_path, variant, params)
    assert verify_says is not None and expected in verify_says
    assert verify_says == create_says


def test_plain_http_with_a_checksum_passes_both(site: Site, tmp_path: Path) -> None:
    params = {"image": "http://images.example.org/x.img", "image_checksum": VALID["image_checksum"]}
    assert verdicts(site, tmp_path, "debian-12", params) == (None, None)
