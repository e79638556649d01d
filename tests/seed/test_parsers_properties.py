"""Properties of the seeding parameters' parsers (user_data, ssh_authorized_keys) on hostile text.

For any value, ``decode_user_data`` and ``parse_authorized_keys`` either succeed or raise
ParameterError, never another exception, and ``classify`` always answers; the conftest profile's
per-example deadline keeps the time bounded.  Values arrive in environment variables, so they are
text whose undecodable bytes are surrogate escapes: both kinds are generated.  Valid values
(cloud-config, scripts, #include lists, MIME, keys with options) are mutated as well.
"""

from __future__ import annotations

import base64
import gzip
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.seed.content import read_instance_id
from instance_cloudimage.seed.rename import rename_metadata_yaml
from instance_cloudimage.seed.reseedplan import UNREADABLE, parse_config
from instance_cloudimage.seed.sshkeys import parse_authorized_keys
from instance_cloudimage.seed.userdata import Kind, classify, decode_user_data

# What os.environ holds: any bytes, decoded with surrogateescape.
env_text = st.one_of(st.text(max_size=400),
                     st.binary(max_size=400).map(lambda b: b.decode("utf-8", "surrogateescape")))

USER_DATA = [
    "#cloud-config\nhostname: a\npackages: [vim]\nusers:\n  - name: x\n    groups: [a, b]\n",
    "#!/bin/sh\necho hi\n",
    "#include\nhttps://example.org/a\n# c\nfile:///x\n",
    "## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n",
    "#cloud-config-archive\n- type: text/x-shellscript\n  content: echo\n",
    'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/x-shellscript\n\n'
    "#!/bin/sh\n--b--\n",
    '{"a": [1, 2, {"b": null}]}',
    "runcmd: [ls]\n",
]


def decode(value: str) -> None:
    try:
        decode_user_data(value)
    except ParameterError:
        pass


@given(env_text)
def test_arbitrary_user_data_is_decoded_or_refused(value: str) -> None:
    assert isinstance(classify(value), Kind)
    decode(value)


@given(st.sampled_from(["#cloud-config\n", "#include\n", "#cloud-config-archive\n", "## template: jinja\n",
                        "MIME-Version: 1.0\n", "", "{", "["]), env_text)
def test_user_data_behind_each_prefix_is_decoded_or_refused(prefix: str, rest: str) -> None:
    decode(prefix + rest)


@st.composite
def mutated_user_data(draw: st.DrawFn) -> str:
    text = list(draw(st.sampled_from(USER_DATA)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        text[at:at + draw(st.integers(0, 3))] = draw(st.text(max_size=4))
    value = "".join(text)
    wrap = draw(st.sampled_from(["plain", "base64", "gzip"]))
    if wrap == "base64":
        return "base64:" + base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()
    if wrap == "gzip":
        return "base64:" + base64.b64encode(gzip.compress(value.encode("utf-8", "surrogateescape"))).decode()
    return value


@given(mutated_user_data())
def test_mutated_user_data_is_decoded_or_refused(value: str) -> None:
    decode(value)


# --- ssh_authorized_keys ------------------------------------------------------------------------

def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _line(type_name: str, *fields: bytes) -> str:
    blob = _string(type_name.encode()) + b"".join(_string(f) for f in fields)
    return f"{type_name} {base64.b64encode(blob).decode()}"


KEYS = [
    _line("ssh-ed25519", bytes(range(32))) + " me@host",
    _line("ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xc3" * 256),
    _line("ecdsa-sha2-nistp256", b"nistp256", b"\x04" + bytes(64)),
    _line("sk-ssh-ed25519@openssh.com", bytes(32), b"ssh:"),
    _line("ssh-ed25519-cert-v01@openssh.com", bytes(32), bytes(200)),
    'restrict,command="echo \\"hi\\"",from="10.0.0.0/8" ' + _line("ssh-ed25519", bytes(32)),
]


def parse_keys(value: str) -> None:
    try:
        keys = parse_authorized_keys(value)
    except ParameterError:
        return
    assert keys


def test_the_valid_keys_are_accepted() -> None:
    assert len(parse_authorized_keys(";".join(KEYS))) == len(KEYS)


@given(env_text)
def test_arbitrary_key_lists_are_parsed_or_refused(value: str) -> None:
    parse_keys(value)


@st.composite
def mutated_keys(draw: st.DrawFn) -> str:
    text = list(draw(st.sampled_from(KEYS)))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        text[at:at + draw(st.integers(0, 3))] = draw(st.text(max_size=3))
    return "".join(text)


@given(st.lists(mutated_keys(), min_size=1, max_size=3))
def test_mutated_keys_are_parsed_or_refused(entries: list[str]) -> None:
    parse_keys("\n".join(entries))


# --- regressions found by the properties ------------------------------------------------------

@pytest.mark.parametrize("value", [
    "#cloud-config\nlast_boot: 2001-02-30\n",        # datetime refuses the day: ValueError
    "#cloud-config\nuid: " + "1" * 5000 + "\n",       # int() refuses 4300 digits and more
    "#cloud-config-archive\n- 0000-01-01\n",
])
def test_a_yaml_value_that_cannot_be_built_is_refused(value: str) -> None:
    with pytest.raises(ParameterError, match="not valid YAML|not a YAML list"):
        decode_user_data(value)


@example("hostname: a\nwhen: 2001-02-30\n")
@given(st.just("x: " + "9" * 5000))
def test_opaque_text_with_an_impossible_yaml_value_stays_opaque(value: str) -> None:
    assert decode_user_data(value) is not None


@pytest.mark.parametrize("url", ["http://[abc", "https://[::1/x", "http://exa\uff0fmple.org/"])
def test_an_include_line_urlsplit_refuses_is_refused(url: str) -> None:
    with pytest.raises(ParameterError, match="#include line 2"):
        decode_user_data(f"#include\n{url}\n")


# The seed files a rename or reseed reads back come from the guest's disk, so they are hostile
# too; yaml.safe_load raised ValueError and RecursionError through these three readers.
GUEST_YAML = [b"instance-id: 2001-02-30\n", b"[" * 2000 + b"]" * 2000, b"a: " + b"1" * 5000]


@pytest.mark.parametrize("data", GUEST_YAML)
def test_guest_seed_yaml_that_cannot_be_built_is_unreadable(data: bytes) -> None:
    assert read_instance_id(data) is None
    assert rename_metadata_yaml(data, lambda value: None) is None
    assert parse_config(data) is UNREADABLE


@given(st.binary(max_size=300))
def test_guest_seed_yaml_is_read_or_unreadable(data: bytes) -> None:
    read_instance_id(data)
    rename_metadata_yaml(data, lambda value: "renamed")
    parse_config(data)
