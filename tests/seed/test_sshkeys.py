"""ssh_authorized_keys: parsing and validation of OpenSSH public keys."""

from __future__ import annotations

import base64
import struct
import subprocess
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import ParameterError
from instance_cloudimage.seed.sshkeys import MAX_KEYS, parse_authorized_keys, parse_key
from tests.conftest import need_tools


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _blob_line(*fields: bytes, type_name: str | None = None, comment: str = "") -> str:
    name = type_name or fields[0].decode()
    blob = b"".join(_string(f) for f in fields)
    return f"{name} {base64.b64encode(blob).decode()} {comment}".strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real keys from ssh-keygen: ed25519, rsa, ecdsa-384 and an ed25519-signed certificate."""
    need_tools("ssh-keygen")
    d: Path = tmp_path_factory.mktemp("keys")
    out = {}
    for name, args in {"ed25519": ["-t", "ed25519"], "rsa": ["-t", "rsa", "-b", "2048"],
                       "ecdsa": ["-t", "ecdsa", "-b", "384"]}.items():
        subprocess.run(["ssh-keygen", "-q", "-N", "", "-C", f"{name}@test", "-f", str(d / name), *args], check=True)
        out[name] = (d / f"{name}.pub").read_text().strip()
    subprocess.run(["ssh-keygen", "-q", "-s", str(d / "ed25519"), "-I", "id", "-n", "root", str(d / "ecdsa.pub")],
                   check=True)
    out["cert"] = (d / "ecdsa-cert.pub").read_text().strip()
    return out


def test_real_keys_of_every_kind_are_accepted(keys: dict[str, str]) -> None:
    parsed = parse_authorized_keys("\n".join(keys.values()))
    assert [k.type for k in parsed] == ["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp384",
                                        "ecdsa-sha2-nistp384-cert-v01@openssh.com"]
    assert parsed[0].comment == "ed25519@test"
    assert parsed[0].line == keys["ed25519"]


def test_security_key_types_are_accepted() -> None:
    ed = _blob_line(b"sk-ssh-ed25519@openssh.com", b"\x01" * 32, b"ssh:", comment="yubikey")
    ec = _blob_line(b"sk-ecdsa-sha2-nistp256@openssh.com", b"nistp256", b"\x04" + b"\x02" * 64, b"ssh:")
    parsed = parse_authorized_keys(f"{ed};{ec}")
    assert [k.type for k in parsed] == ["sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"]


@pytest.mark.parametrize("sep", [";", "\n", "\r\n", " ;\n\n; "])
def test_separators_newline_and_semicolon(keys: dict[str, str], sep: str) -> None:
    parsed = parse_authorized_keys(sep.join([keys["ed25519"], keys["rsa"]]))
    assert [k.type for k in parsed] == ["ssh-ed25519", "ssh-rsa"]


def test_comment_lines_and_duplicates_are_dropped(keys: dict[str, str]) -> None:
    parsed = parse_authorized_keys(f"# admins\n{keys['rsa']}\n{keys['rsa'].rsplit(' ', 1)[0]} other comment")
    assert len(parsed) == 1


def test_options_from_sshd_list_are_kept(keys: dict[str, str]) -> None:
    line = f'from="10.0.0.0/8,192.0.2.1",no-pty,command="echo hi there" {keys["ed25519"]}'
    (key,) = parse_authorized_keys(line)
    assert key.options == 'from="10.0.0.0/8,192.0.2.1",no-pty,command="echo hi there"'
    assert key.type == "ssh-ed25519"
    assert key.line == line


@pytest.mark.parametrize("options", ["bogus-option", 'no-pty="x"', "command", 'from="unterminated'])
def test_unknown_or_misused_options_are_refused(keys: dict[str, str], options: str) -> None:
    with pytest.raises(ParameterError, match="entry 1"):
        parse_authorized_keys(f"{options} {keys['ed25519']}")


def test_embedded_type_must_match_declared_type(keys: dict[str, str]) -> None:
    body = keys["ed25519"].split()[1]
    with pytest.raises(ParameterError, match="entry 2 has key data that does not match its type"):
        parse_authorized_keys(f"{keys['rsa']}\nssh-rsa {body}")


def test_truncated_key_is_refused(keys: dict[str, str]) -> None:
    t, body, _ = keys["rsa"].split()
    blob = base64.b64decode(body)[:-10]
    with pytest.raises(ParameterError, match="does not match its type"):
        parse_key(1, f"{t} {base64.b64encode(blob).decode()}")


@pytest.mark.parametrize("line,why", [
    ("ssh-ed25519 !!!notbase64", "not valid base64"),
    ("ssh-ed25519", "no key data"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "DSA"),
    ("hunter2 AAAA", "known key type"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "PRIVATE"),
    ("---- BEGIN SSH2 PUBLIC KEY ----", "RFC 4716"),
])
def test_bad_entries_are_refused_with_a_reason(line: str, why: str) -> None:
    with pytest.raises(ParameterError, match=why):
        parse_key(1, line)


def test_wrong_curve_and_short_rsa_are_refused() -> None:
    wrong_curve = _blob_line(b"ecdsa-sha2-nistp256", b"nistp384", b"\x04" + b"\x01" * 96)
    with pytest.raises(ParameterError, match="curve mismatch"):
        parse_key(1, wrong_curve)
    short_rsa = _blob_line(b"ssh-rsa", b"\x01\x00\x01", b"\x00" + b"\xff" * 64)
    with pytest.raises(ParameterError, match="shorter than 1024"):
        parse_key(1, short_rsa)
    trailing = _blob_line(b"ssh-ed25519", b"\x01" * 32, b"extra")
    with pytest.raises(ParameterError, match="trailing data"):
        parse_key(1, trailing)


def test_messages_never_contain_the_value(keys: dict[str, str]) -> None:
    secret = "s3cret-Passw0rd"
    for value in (secret, f"ssh-ed25519 {secret}", f"{keys['rsa']}\nssh-rsa {secret}=="):
        with pytest.raises(ParameterError) as e:
            parse_authorized_keys(value)
        assert secret not in str(e.value)


def test_empty_and_too_many() -> None:
    with pytest.raises(ParameterError, match="holds no key"):
        parse_authorized_keys(" ;\n# only a comment")
    line = _blob_line(b"ssh-ed25519", b"\x01" * 32)
    with pytest.raises(ParameterError, match=f"at most {MAX_KEYS}"):
        parse_authorized_keys(";".join([line] * (MAX_KEYS + 1)))


def test_control_characters_are_refused(keys: dict[str, str]) -> None:
    with pytest.raises(ParameterError, match="control characters"):
        parse_key(1, keys["ed25519"] + "\x1b[2J")
