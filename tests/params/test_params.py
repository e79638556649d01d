"""OS parameter declarations, parameters.list and verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.simulate import simulated_core_environment
from instance_cloudimage.params.table import PARAMETERS, Parameter, Text, render_parameters_list, validate_parameters
from instance_cloudimage.runtime.siteconfig import INSTALL_INFO, Paths, SiteConfig, load_site_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def site(tmp_path: Path) -> SiteConfig:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.qcow2").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"secret")
    os.symlink(tmp_path / "outside", images / "escape.img")
    os.symlink("/etc/passwd", images / "passwd.img")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {images}\n")
    return load_site_config(Paths(etc, tmp_path / "cache"))


def test_parameters_list_has_one_named_described_line_each() -> None:
    text = render_parameters_list()
    lines = text.splitlines()
    assert text.endswith("\n") and "" not in lines
    assert len(lines) == len(PARAMETERS)
    for line, p in zip(lines, PARAMETERS, strict=True):
        name, description = line.split(" ", 1)
        assert name == p.name and description.strip()
        assert not line.startswith("#")


def test_valid_parameters_pass(site: SiteConfig) -> None:
    images = site.allowed_dirs[0]
    params = {
        "image": f"{images}/ok.qcow2",
        "image_checksum": "sha256:" + "0" * 64,
        "arch": "aarch64",
    }
    assert validate_parameters(params, site) == []
    assert validate_parameters({"image": "https://cloud.example.org/x.qcow2"}, site) == []
    assert validate_parameters({"image": f"file://{images}/ok.qcow2"}, site) == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"nope": "1"}, "unknown OS parameter 'nope'"),
        ({"image_checksum": "md5:d41d8cd98f00b204e9800998ecf8427e"}, "image_checksum must be sha256"),
        ({"image_checksum": "sha256:abc"}, "image_checksum must be sha256"),
        ({"image": "relative.img"}, "must be an absolute path or an http(s) URL"),
        ({"image": "ftp://example.org/x.img"}, "scheme 'ftp' is not supported"),
        ({"image": "/etc/passwd"}, "points into /etc"),
        ({"image": "/srv/elsewhere/x.img"}, "outside the allowed image directories"),
        ({"image": "https:///nohost"}, "has no host"),
        ({"arch": "x86 64"}, "arch must be a machine name"),
    ],
)
def test_invalid_parameters_give_one_message_without_the_value(
    site: SiteConfig, params: dict[str, str], message: str
) -> None:
    problems = validate_parameters(params, site)
    assert len(problems) == 1
    assert message in problems[0]
    for value in params.values():
        if len(value) > 8:  # the value itself must never be printed
            assert value not in problems[0]


def test_paths_escaping_the_allowed_directory_are_refused(site: SiteConfig) -> None:
    images = site.allowed_dirs[0]
    for bad, why in [
        (f"{images}/../outside", "'..'"),
        (f"{images}/escape.img", "outside the allowed image directories"),
        (f"{images}/passwd.img", "points into /etc"),
        (f"{images}/missing.img", "cannot be read"),
        (images, "outside the allowed image directories"),
    ]:
        problems = validate_parameters({"image": bad}, site)
        assert problems and why in problems[0], (bad, problems)


def run_verify(env: dict[str, str], os_dir: Path) -> subprocess.CompletedProcess[str]:
    """scripts/verify as installed in ``os_dir``, so it reads the config directory recorded there
    rather than this machine's /etc/ganeti/instance-cloudimage."""
    return subprocess.run(
        [sys.executable, str(os_dir / "verify"), "parameters"],
        env=env, capture_output=True, text=True, check=False,
    )


@pytest.fixture
def verify_os_dir(tmp_path: Path) -> Path:
    os_dir = tmp_path / "os"
    os_dir.mkdir()
    (os_dir / "verify").write_text((REPO / "scripts" / "verify").read_text())
    (os_dir / INSTALL_INFO).write_text(json.dumps({"config_dir": str(tmp_path / "etc"),
                                                   "cache_dir": str(tmp_path / "cache")}))
    return os_dir


def test_verify_script_reports_each_problem_and_fails(verify_os_dir: Path) -> None:
    ok = run_verify(simulated_core_environment("demo", params={"arch": "x86_64"}), verify_os_dir)
    assert ok.returncode == 0, ok.stderr
    secret = "md5:topsecretvalue"
    bad = run_verify(simulated_core_environment("nosuch", params={"image_checksum": secret, "arch": "x 86"}),
                     verify_os_dir)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 3, bad.stderr
    assert all(line.startswith("cloudimage verify: ") for line in lines)
    assert "image_checksum must be sha256" in bad.stderr
    assert "unknown variant 'nosuch'" in bad.stderr
    assert secret not in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("url", ["https://[SECRET:zz]/x.img", "https://[1::SECRET]/x.img", "https://[SECRET/x.img",
                                 "http://h]SECRET/x.img"])
def test_malformed_image_url_is_refused_without_echoing_it(site: SiteConfig, url: str) -> None:
    problems = validate_parameters({"image": url}, site)
    assert problems == ["image is not a valid URL (check the brackets around an IPv6 address)"]
    assert "SECRET" not in problems[0]


def test_a_fifo_swapped_in_after_the_check_does_not_hang_create(tmp_path: Path) -> None:
    # A user who may put images into an allowed directory replaces the checked file by a FIFO:
    # opening it for reading would wait for a writer forever (Ganeti's create timeout is a day).
    import signal

    from instance_cloudimage.runtime.errors import ParameterError
    from instance_cloudimage.runtime.localpath import open_local_image

    fifo = tmp_path / "image.qcow2"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("open blocked")))
    signal.alarm(5)
    try:
        with pytest.raises(ParameterError, match="image file is not a regular file"):
            open_local_image(fifo, tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


# Every character that has no place in a one-line value, generated: C0, DEL, C1, U+2028, U+2029.
CONTROLS = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))] + ["\u2028", "\u2029"]
ALLOWED_IN = {Text.LINE: "", Text.LINES: "\n\r", Text.ANY: "".join(CONTROLS)}
MARK = "VALUE-NOBODY-MAY-SEE"


@pytest.mark.parametrize("param", PARAMETERS, ids=[p.name for p in PARAMETERS])
def test_control_characters_are_refused_where_the_format_has_no_place(param: Parameter, site: SiteConfig) -> None:
    refused = []
    for char in CONTROLS:
        problems = validate_parameters({param.name: f"{MARK}{char}{MARK}"}, site)
        if char in ALLOWED_IN[param.text]:
            assert not any("control character" in p for p in problems), (repr(char), problems)
            continue
        assert len(problems) == 1 and param.name in problems[0] and "control character" in problems[0], \
            (repr(char), problems)
        assert MARK not in problems[0] and "\n" not in problems[0]
        refused.append(char)
    assert len(refused) == len(CONTROLS) - len(ALLOWED_IN[param.text])


@pytest.mark.parametrize("param", [p for p in PARAMETERS if p.text is Text.LINE], ids=lambda p: p.name)
@pytest.mark.parametrize("pad", [" ", "\u00a0", "  ", "\u3000"], ids=["space", "nbsp", "spaces", "ideographic"])
@pytest.mark.parametrize("where", ["leading", "trailing"])
def test_white_space_around_a_one_line_value_is_refused(param: Parameter, pad: str, where: str,
                                                        site: SiteConfig) -> None:
    value = f"{pad}{MARK}" if where == "leading" else f"{MARK}{pad}"
    problems = validate_parameters({param.name: value}, site)
    assert problems == [f"{param.name} must not start or end with white space"]


def test_the_verify_script_refuses_a_line_separator(verify_os_dir: Path) -> None:
    """Ganeti runs verify before create: both call validate_parameters, which refuses this."""
    env = simulated_core_environment("demo", params={"hostname": "vm1\u2028evil"})
    result = run_verify(env, verify_os_dir)
    assert result.returncode != 0
    assert "hostname contains a control character or a Unicode line separator" in result.stderr
    assert "evil" not in result.stderr
