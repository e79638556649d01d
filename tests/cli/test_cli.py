"""The instance-cloudimage command with bad input: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.simulate import simulated_core_environment
from instance_cloudimage.runtime.errors import ParameterError
from tests.conftest import Site, cli


def assert_one_line_error(r: subprocess.CompletedProcess[str], phrase: str) -> None:
    rc, err = r.returncode, r.stderr
    assert rc in (1, 2), err
    assert "Traceback" not in err and "internal error" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instance-cloudimage: error: "), err
    assert phrase in lines[0], lines[0]


@pytest.mark.parametrize(("size", "phrase"), [
    ("lots", "--disk-size must be a size such as 10G or 512M"),
    ("99999999T", "--disk-size is too large"),
])
def test_bad_disk_size(site: Site, tmp_path: Path, size: str, phrase: str) -> None:
    disk = tmp_path / "disk.img"
    assert_one_line_error(cli("create", "--disk", str(disk), "--disk-size", size, *site.cli_args()), phrase)
    assert not disk.exists()


def test_disk_that_cannot_be_created(site: Site, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = cli("create", "--disk", str(tmp_path / "file" / "disk.img"), *site.cli_args())
    disk = tmp_path / "file" / "disk.img"
    assert_one_line_error(r, f"cannot create the disk file {disk}: a parent is not a directory")


def test_os_parameter_without_a_value_is_not_echoed(site: Site, tmp_path: Path) -> None:
    # Someone who forgets 'name=' may have typed the value itself (a password hash, a key).
    r = cli("create", "--disk", str(tmp_path / "d.img"), "-O", "image=/x", "-O", "$6$SECRET", *site.cli_args())
    assert_one_line_error(r, "-O expects name=value; argument 2 has no '='")
    assert "SECRET" not in r.stderr


SECRET_HASH = "$6$SALTSALT$SECRETHASHVALUE"


def test_os_parameter_from_a_file(site: Site, tmp_path: Path) -> None:
    value = tmp_path / "network"
    value.write_text("dhcp\n")  # valid, where "@/.../network" is not: verify names only the bad seed
    r = cli("create", "--disk", str(tmp_path / "d.img"), "-O", f"network=@{value}", "-O", "seed=bogus",
            *site.cli_args())
    assert_one_line_error(r, "seed must be")
    assert "more problems" not in r.stderr


def test_os_parameter_from_stdin(site: Site, tmp_path: Path) -> None:
    r = cli("create", "--disk", str(tmp_path / "d.img"), "-O", "network=@-", "-O", "seed=bogus", *site.cli_args(),
            stdin="dhcp\n")
    assert_one_line_error(r, "seed must be")
    assert "more problems" not in r.stderr


def test_os_parameter_files_literal_at_and_final_newline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from instance_cloudimage.cli.main import parse_option_pairs

    (tmp_path / "h").write_text(SECRET_HASH + "\n")
    (tmp_path / "u").write_text("#cloud-config\nruncmd: []\n\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin\r\n")))
    got = parse_option_pairs([f"password_hash=@{tmp_path / 'h'}", f"user_data=@{tmp_path / 'u'}",
                              "hostname=@@web", "image=@-"])
    assert got == {"password_hash": SECRET_HASH, "user_data": "#cloud-config\nruncmd: []\n",
                   "hostname": "@web", "image": "from stdin"}
    with pytest.raises(ParameterError, match="stdin was already read"):
        parse_option_pairs(["image=@-", "user_data=@-"])


@pytest.mark.parametrize(("content", "phrase"), [
    (None, "cannot read the value of -O user_data from {path}: No such file or directory"),
    (b"\xffSECRETUSERDATA", "the value of -O user_data in {path} is not UTF-8 text"),
])
def test_os_parameter_file_that_cannot_be_read(site: Site, tmp_path: Path, content: bytes | None,
                                               phrase: str) -> None:
    path = tmp_path / "user-data"
    if content is not None:
        path.write_bytes(content)
    r = cli("create", "--disk", str(tmp_path / "d.img"), "-O", f"user_data=@{path}", *site.cli_args())
    assert_one_line_error(r, phrase.format(path=path))
    assert "SECRET" not in r.stderr and not (tmp_path / "d.img").exists()


def test_inline_secret_parameters_warn(site: Site, tmp_path: Path) -> None:
    # --disk-size fails right after the parameters are read: only their handling shows.
    r = cli("create", "--disk", str(tmp_path / "d.img"), "--disk-size", "lots", "-O", f"password_hash={SECRET_HASH}",
            "-O", "user_data=#cloud-config", "-O", "hostname=web1", *site.cli_args())
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 3, r.stderr
    for line, name in zip(lines, ("password_hash", "user_data"), strict=False):
        assert line.startswith(f"instance-cloudimage: warning: -O {name} is secret"), line
        assert f"{name}=@FILE" in line
    assert "--disk-size must be" in lines[2]
    assert "SECRET" not in r.stderr and "cloud-config" not in r.stderr and "hostname" not in r.stderr


def test_secret_parameters_from_a_file_or_stdin_do_not_warn(site: Site, tmp_path: Path) -> None:
    (tmp_path / "h").write_text(SECRET_HASH)
    r = cli("create", "--disk", str(tmp_path / "d.img"), "--disk-size", "lots",
            "-O", f"password_hash=@{tmp_path / 'h'}", "-O", "user_data=@-", "-O", "network=dhcp",
            *site.cli_args(), stdin="#cloud-config\n")
    assert_one_line_error(r, "--disk-size must be")


def test_verify_does_no_network_io(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ganeti runs verify on every node, several times per operation, under a 300 s timeout: it
    must not resolve names or connect anywhere, even for a URL parameter and a variant whose image
    comes with a checksum file and a signature."""
    import socket

    from instance_cloudimage.scripts import main as climod

    calls: list[str] = []

    def refuse(what: str):  # type: ignore[no-untyped-def]
        def blocked(*args: object, **kwargs: object) -> None:
            calls.append(what)
            raise OSError("network I/O in verify")
        return blocked

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "gethostbyname", refuse("gethostbyname"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    env = simulated_core_environment("debian-12", params={
        "image": "https://cloud.example.org/images/x.qcow2", "image_checksum": "sha256:" + "a" * 64,
        "user_data": "#include\nhttps://config.example.org/user-data\n", "hostname": "vm1.example.org"})
    monkeypatch.setattr("instance_cloudimage.scripts.main.installed_paths",
                        lambda argv0: climod.Paths(tmp_path / "etc", tmp_path / "cache"))
    try:
        assert climod.os_script_main("verify", environ=env, argv=["verify", "parameters"]) == 0
    finally:
        import logging

        logging.getLogger("instance_cloudimage").handlers.clear()
    assert calls == []
    assert not (tmp_path / "cache").exists()  # nor does it touch the image cache


def verify_in_process(variant: str, params: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import logging

    from instance_cloudimage.scripts import main as climod

    monkeypatch.setattr("instance_cloudimage.scripts.main.installed_paths",
                        lambda argv0: climod.Paths(tmp_path / "etc", tmp_path / "cache"))
    env = simulated_core_environment(variant, params=params)
    try:
        rc = climod.os_script_main("verify", environ=env, argv=["verify", "parameters"])
    finally:
        logging.getLogger("instance_cloudimage").handlers.clear()
    return rc, capsys.readouterr().err


def test_verify_refuses_an_arch_the_variant_has_no_image_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Caught at gnt-instance add, instead of when create looks for the image.
    rc, err = verify_in_process("demo", {"arch": "riscv64"}, tmp_path, monkeypatch, capsys)
    assert rc == 1
    assert err.strip().splitlines() == [
        "cloudimage verify: error: variant demo has no image for architecture riscv64 (available: x86_64, aarch64)"]
    # With an image of its own the variant's architectures do not matter.
    rc, err = verify_in_process("demo", {"arch": "riscv64", "image": "https://example.org/x"},
                                tmp_path, monkeypatch, capsys)
    assert rc == 0, err
