"""user_data: decoding, classification by cloud-init's rules, merging, MIME assembly."""

from __future__ import annotations

import base64
import email
import gzip

import pytest
import yaml

from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.seed.userdata import (
    MAX_DECODED,
    MAX_PARAM,
    OUR_MERGE_TYPE,
    OUR_PART_NAME,
    Kind,
    UserData,
    assemble_for_cloud_init,
    assemble_mime,
    classify,
    decode_user_data,
    merge_configs,
    render_cloud_config,
)

SAMPLES = {
    Kind.CLOUD_CONFIG: "#cloud-config\npackages: [htop]\n",
    Kind.SCRIPT: "#!/bin/sh\necho hi\n",
    Kind.INCLUDE: "#include\nhttps://example.test/a.yaml\n",
    Kind.INCLUDE_ONCE: "#include-once\nhttps://example.test/a.yaml\n",
    Kind.JINJA: "## template: jinja\n#cloud-config\nruncmd: [echo {{ v1.local_hostname }}]\n",
    Kind.BOOTHOOK: "#cloud-boothook\n#!/bin/sh\ntrue\n",
    Kind.PART_HANDLER: "#part-handler\ndef list_types(): return []\n",
    Kind.ARCHIVE: "#cloud-config-archive\n- type: text/cloud-config\n  content: 'a: 1'\n",
    Kind.JSONP: '#cloud-config-jsonp\n[{"op": "add", "path": "/a", "value": 1}]\n',
    Kind.MIME: 'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n--XX\n'
               'Content-Type: text/x-shellscript\n\n#!/bin/sh\ntrue\n--XX--\n',
    Kind.OPAQUE: '{"role": "db", "replicas": 3}\n',
}


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_is_classified_and_accepted(kind: Kind) -> None:
    ud = decode_user_data(SAMPLES[kind])
    assert ud is not None and ud.kind is kind and ud.text == SAMPLES[kind]


def test_classification_follows_cloud_init_case_and_whitespace_rules() -> None:
    assert classify("  \n#Cloud-Config\na: 1") is Kind.CLOUD_CONFIG
    assert classify("#cloud-config-archive\n[]") is Kind.ARCHIVE  # longest prefix wins
    assert classify("X-Thing: 1\nMIME-Version: 1.0\n\nbody") is Kind.MIME
    # cloud-init's email parser gives a text without a header line back as one typed body
    assert classify("#!/bin/sh\necho MIME-Version: 1.0\n") is Kind.SCRIPT
    assert classify("#cloud-config\nwrite_files: [{path: /x, content: 'MIME-Version: 1.0'}]") is Kind.CLOUD_CONFIG


def test_base64_and_gzip_are_decoded() -> None:
    text = SAMPLES[Kind.SCRIPT]
    b64 = "base64:" + base64.b64encode(text.encode()).decode()
    gz = "base64:" + base64.encodebytes(gzip.compress(SAMPLES[Kind.CLOUD_CONFIG].encode())).decode()
    assert decode_user_data(b64) == UserData(Kind.SCRIPT, text)
    got = decode_user_data(gz)
    assert got is not None and got.kind is Kind.CLOUD_CONFIG and got.config == {"packages": ["htop"]}


@pytest.mark.parametrize("value,why", [
    ("base64:not*base64", "not valid base64"),
    ("base64:" + base64.b64encode(b"\x1f\x8bnot gzip").decode(), "does not decompress"),
    ("base64:" + base64.b64encode(gzip.compress(b"\0" * (MAX_DECODED + 1))).decode(), "decompresses to more"),
    ("base64:" + base64.b64encode(b"\xff\xfe binary").decode(), "not UTF-8"),
    ("#cloud-config\n" + "x" * MAX_PARAM, "longer than 64 KiB"),
    ("#cloud-config\npassword: s3cret\nbad: [unclosed\n", "not valid YAML \\(line [0-9]+\\)"),
    ("#cloud-config\n- a list\n", "not a mapping"),
    ("#include\nftp://example.test/x\n", "line 2 is not an http"),
    ("#cloud-config-archive\na: 1\n", "not a YAML list"),
    ("## template: jinja\nhello {{ x }}\n", "jinja template"),
    ('{"role": "db", s3cret}', "looks like JSON"),
    ("users:\n  - name: bob\npassword: s3cret\n", "does not start with #cloud-config"),
])
def test_bad_user_data_is_refused_without_echoing_it(value: str, why: str) -> None:
    with pytest.raises(ParameterError, match=why) as e:
        decode_user_data(value)
    assert "s3cret" not in str(e.value) and "unclosed" not in str(e.value)


def test_empty_user_data_is_none() -> None:
    assert decode_user_data("") is None
    assert decode_user_data("  \n") is None
    assert decode_user_data("base64:" + base64.b64encode(b"\n").decode()) is None


def test_free_text_that_is_not_cloud_config_is_opaque() -> None:
    ud = decode_user_data("role=db\nreplicas=3\n")
    assert ud is not None and ud.kind is Kind.OPAQUE


def test_merge_policy_user_wins_lists_join_mappings_merge() -> None:
    ours = {"manage_etc_hosts": "localhost", "runcmd": [["a"]], "user": {"name": "debian", "lock_passwd": False}}
    theirs = {"manage_etc_hosts": True, "runcmd": [["a"], ["b"]], "user": {"name": "bob"}, "packages": ["x"]}
    merged = merge_configs(ours, theirs)
    assert merged == {"manage_etc_hosts": True, "runcmd": [["a"], ["b"]],
                      "user": {"name": "bob", "lock_passwd": False}, "packages": ["x"]}
    assert list(merged) == ["manage_etc_hosts", "runcmd", "user", "packages"]


def test_rendered_cloud_config_starts_exactly_with_the_header() -> None:
    text = render_cloud_config({"hashed": "$y$j9T$abc$def", "n": 1})
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text) == {"hashed": "$y$j9T$abc$def", "n": 1}


def test_cloud_config_user_data_is_merged_into_one_document() -> None:
    user = decode_user_data("#cloud-config\nmanage_etc_hosts: true\npackages: [htop]\n")
    out = assemble_for_cloud_init({"manage_etc_hosts": "localhost", "x": 1}, user)
    assert out.vendor_data is None
    assert yaml.safe_load(out.user_data) == {"manage_etc_hosts": True, "x": 1, "packages": ["htop"]}


@pytest.mark.parametrize("kind", [Kind.SCRIPT, Kind.INCLUDE, Kind.JINJA, Kind.BOOTHOOK, Kind.ARCHIVE])
def test_other_kinds_become_the_first_mime_part_untouched(kind: Kind) -> None:
    user = decode_user_data(SAMPLES[kind])
    assert user is not None
    out = assemble_for_cloud_init({"manage_etc_hosts": "localhost"}, user)
    msg = email.message_from_string(out.user_data)
    assert msg.is_multipart() and msg["MIME-Version"] == "1.0"
    first, ours = msg.get_payload()
    assert first.get_content_type() == kind.value
    assert first.get_payload(decode=True).decode() == SAMPLES[kind]
    assert ours.get_content_type() == "text/cloud-config"
    assert ours["Merge-Type"] == OUR_MERGE_TYPE and ours.get_filename() == OUR_PART_NAME
    assert yaml.safe_load(ours.get_payload(decode=True)) == {"manage_etc_hosts": "localhost"}


def test_user_mime_is_nested_verbatim() -> None:
    user = decode_user_data(SAMPLES[Kind.MIME])
    assert user is not None
    out = assemble_for_cloud_init({"a": 1}, user)
    assert SAMPLES[Kind.MIME] in out.user_data
    leaves = [p for p in email.message_from_string(out.user_data).walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in leaves] == ["text/x-shellscript", "text/cloud-config"]


def test_non_ascii_parts_are_base64_and_exact() -> None:
    script = "#!/bin/sh\n# Grüße aus Zürich\necho ✓\n"
    out = assemble_mime(UserData(Kind.SCRIPT, script), render_cloud_config({"a": 1}))
    first = email.message_from_string(out).get_payload()[0]
    assert first["Content-Transfer-Encoding"] == "base64"
    assert first.get_payload(decode=True).decode() == script


def test_boundary_never_occurs_in_the_parts() -> None:
    first = UserData(Kind.SCRIPT, "#!/bin/sh\n")
    ours = render_cloud_config({"a": 1})
    plain = assemble_mime(first, ours)
    boundary = email.message_from_string(plain).get_boundary()
    assert boundary is not None
    tricky = UserData(Kind.SCRIPT, f"#!/bin/sh\necho '--{boundary}'\n")
    out = assemble_mime(tricky, ours)
    msg = email.message_from_string(out)
    assert msg.get_boundary() != boundary
    assert msg.get_payload()[0].get_payload(decode=True).decode() == tricky.text


def test_opaque_user_data_stays_byte_identical_and_ours_goes_to_vendor_data() -> None:
    user = decode_user_data(SAMPLES[Kind.OPAQUE])
    out = assemble_for_cloud_init({"manage_etc_hosts": "localhost"}, user)
    assert out.user_data == SAMPLES[Kind.OPAQUE]
    assert out.vendor_data is not None and yaml.safe_load(out.vendor_data) == {"manage_etc_hosts": "localhost"}


def test_no_user_data_gives_our_cloud_config() -> None:
    out = assemble_for_cloud_init({"manage_etc_hosts": "localhost"}, None)
    assert out.user_data == "#cloud-config\nmanage_etc_hosts: localhost\n" and out.vendor_data is None


@pytest.mark.parametrize("text", [
    "#cloud-config\na: " + "[" * 450 + "]" * 450,  # parses, but dumping it again would not
    "#cloud-config\na: " + "[" * 1500,
    "#cloud-config\n" + "a: {" * 1500,
    "#cloud-config-archive\n" + "[" * 1500,
    "[" * 1500 + "]" * 1500,  # opaque JSON
])
def test_deeply_nested_user_data_is_a_parameter_error(text: str) -> None:
    with pytest.raises(ParameterError, match="user_data is nested too deeply"):
        ud = decode_user_data(text)
        assemble_for_cloud_init({"a": 1}, ud)


def test_deeply_nested_free_text_stays_opaque() -> None:
    # Not JSON and not cloud-config: nothing to check, however YAML would nest it.
    ud = decode_user_data("x: " + "[" * 1500)
    assert ud is not None and ud.kind is Kind.OPAQUE


def test_reasonably_nested_cloud_config_is_fine() -> None:
    ud = decode_user_data("#cloud-config\na: " + "[" * 40 + "1" + "]" * 40)
    assert ud is not None and "1" in assemble_for_cloud_init({"a": 1}, ud).user_data
