"""Hostile input everywhere: every parameter, Ganeti variable, site setting and variant key gets
values nobody should send.  Each must end in one 'error:' line and exit 1 or 2 (or succeed);
exit 3 (internal error) or a traceback at DEBUG_LEVEL=0 is a bug.

The OS scripts run in this process through entry.os_script_main, as scripts/<verb> calls it; the
disk is a small file, so a create whose input happens to be valid stops early at "image too large".
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.env import Script
from instance_cloudimage.ganeti.simulate import SimulatedTransfer, simulated_core_environment, simulated_environment
from instance_cloudimage.ganeti.variants import VARIANT_SETTINGS, host_architecture, load_variant
from instance_cloudimage.params.table import PARAMETERS
from instance_cloudimage.runtime.errors import UserError
from instance_cloudimage.runtime.siteconfig import SITE_SETTINGS, Paths, load_site_config
from instance_cloudimage.scripts import main as entry

NASTY = {
    "empty": "",
    "blank": "  \t ",
    "newline": "a\nb",
    "crlf": "x\r\ny",
    "control": "\x01\x1b[31m\x7f",
    "unicode": "\u00e9\u2603\U0001f600",
    "rtl": "\u202eevil",
    "surrogate": "\udcff\udcfe",
    "huge": "A" * 200_000,
    "huge-lines": "x\n" * 50_000,
    "format": "%s %(x)s {0} {name}",
    "dotdot": "../../../../etc/passwd",
    # Absolute, into /etc, but naming no file: these values reach DISK_0_PATH and IMPORT_DEVICE,
    # and a real host file there would be the disk a wrong turn writes to.
    "absolute": "/etc/instance-cloudimage-fuzz-no-such-file",
    "dash": "-rf",
    "equals": "a=b=c",
    "json": '{"a": [1, {"b": null}]}',
    "brackets": "[[[[[[[[[[",
    "ipv6-url": "https://[::1%25eth0]:99999/x",
    "bad-url": "https://[zz/",
    "number": "99999999999999999999999999",
    "negative": "-1",
    "nan": "nan",
}
# An environment cannot carry a NUL (execve's strings end at it); a file can.
IN_FILES = NASTY | {"nul": "a\x00b"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    base = tmp_path_factory.mktemp("fuzz")
    (base / "etc").mkdir()
    (base / "images").mkdir()
    (base / "etc" / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {base / 'images'}\n"
                                                "[HTTP]\nRetries = 0\nConnectTimeout = 1\n")
    return Paths(base / "etc", base / "cache")


@pytest.fixture()
def disk(tmp_path: Path) -> Path:
    d = tmp_path / "disk.img"
    with open(d, "wb") as f:
        f.truncate(1 << 20)  # far too small for any image: a valid create stops before writing
    return d


@pytest.fixture(autouse=True)
def in_process(monkeypatch: pytest.MonkeyPatch, paths: Paths) -> Iterator[None]:
    monkeypatch.setattr("instance_cloudimage.scripts.main.installed_paths", lambda argv0: paths)
    yield
    logging.getLogger("instance_cloudimage").handlers.clear()


def base_env(verb: str, disk: Path) -> dict[str, str]:
    """A well-formed environment for ``verb``, for a test to spoil."""
    if verb == "verify":
        return simulated_core_environment("demo")
    return simulated_environment("demo", [disk], instance_name="vm1.example.org", instance_uuid=str(uuid.uuid4()),
                                 nics=1, old_name="vm0.example.org" if verb == "rename" else None,
                                 transfer=SimulatedTransfer(Script(verb)) if verb in ("export", "import") else None)


def run_script(verb: str, env: Mapping[str, str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = entry.os_script_main(verb, environ=env, argv=[f"/fuzz/{verb}"] + (["parameters"] if verb == "verify" else []))
    return rc, capsys.readouterr().err


def assert_clean(rc: int, err: str, *, may_succeed: bool = True, debug: bool = False) -> None:
    assert rc != entry.EXIT_BUG and "internal error" not in err, err
    assert debug or "Traceback" not in err, err
    if rc == 0:
        assert may_succeed, err
        return
    assert rc in (1, 2), err
    assert err.strip().splitlines()[-1].split(": ", 1)[1].startswith("error: "), err


@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
@pytest.mark.parametrize("name", [p.name for p in PARAMETERS] + ["not_a_parameter"])
def test_verify_with_a_nasty_parameter(name: str, value: str, disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = base_env("verify", disk) | {f"OSP_{name.upper()}": value}
    assert_clean(*run_script("verify", env, capsys))


@pytest.mark.integration
@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
@pytest.mark.parametrize("name", [p.name for p in PARAMETERS])
def test_create_with_a_nasty_parameter(name: str, value: str, disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = base_env("create", disk) | {f"OSP_{name.upper()}": value}
    rc, err = run_script("create", env, capsys)
    assert_clean(rc, err, may_succeed=False)  # the disk is too small for the demo image


GANETI_VARIABLES = ["OS_API_VERSION", "OS_NAME", "OS_VARIANT", "DEBUG_LEVEL", "INSTANCE_NAME", "INSTANCE_UUID",
                    "DISK_COUNT", "DISK_0_PATH", "DISK_0_ACCESS", "DISK_0_SIZE", "DISK_0_URI", "NIC_COUNT",
                    "NIC_0_MAC", "NIC_0_IP", "NIC_0_NETWORK_NAME", "NIC_0_NETWORK_SUBNET", "NIC_0_NETWORK_GATEWAY",
                    "NIC_0_NETWORK_SUBNET6", "INSTANCE_REINSTALL", "HYPERVISOR", "INSTANCE_SECONDARY_NODES"]


@pytest.mark.integration
@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
@pytest.mark.parametrize("name", GANETI_VARIABLES)
def test_create_with_a_nasty_ganeti_variable(name: str, value: str, disk: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    env = base_env("create", disk) | {name: value}
    if name.startswith("NIC_0_NETWORK_") and name != "NIC_0_NETWORK_NAME":
        env["NIC_0_NETWORK_NAME"] = "net1"
    rc, err = run_script("create", env, capsys)
    # A DEBUG_LEVEL above 0 asks for tracebacks.
    assert_clean(rc, err, may_succeed=False, debug=name == "DEBUG_LEVEL" and value.isdigit())


@pytest.mark.parametrize("value", list(NASTY.values()), ids=list(NASTY))
@pytest.mark.parametrize(("verb", "name"), [
    ("rename", "OLD_INSTANCE_NAME"), ("rename", "INSTANCE_NAME"), ("rename", "DISK_0_PATH"),
    ("export", "EXPORT_INDEX"), ("export", "EXPORT_DEVICE"), ("export", "EXP_SIZE_FD"),
    ("import", "IMPORT_INDEX"), ("import", "IMPORT_DEVICE"),
])
def test_rename_export_import_with_a_nasty_variable(verb: str, name: str, value: str, disk: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    env = base_env(verb, disk) | {name: value}
    with open("/dev/null", "w") as out, open("/dev/null") as inp:
        # The export stream goes nowhere (not into pytest's capture); the import stream is empty.
        monkeypatch.setattr("instance_cloudimage.verbs.export.sys.stdout", out)
        monkeypatch.setattr("instance_cloudimage.verbs.import_disk.sys.stdin", inp)
        assert_clean(*run_script(verb, env, capsys))


@pytest.mark.parametrize("value", list(IN_FILES.values()), ids=list(IN_FILES))
@pytest.mark.parametrize("setting", SITE_SETTINGS, ids=[f"{s.section}.{s.key}" for s in SITE_SETTINGS])
def test_site_setting_with_a_nasty_value(setting: object, value: str, tmp_path: Path) -> None:
    paths = Paths(tmp_path, tmp_path / "cache")
    text = value.replace("\n", "\n ")  # an INI continuation line, as an administrator might write it
    paths.site_config.write_text(f"[{setting.section}]\n{setting.key} = {text}\n",  # type: ignore[attr-defined]
                                 encoding="utf-8", errors="surrogateescape")
    try:
        load_site_config(paths)
    except UserError:
        pass


@pytest.mark.parametrize("value", list(IN_FILES.values()), ids=list(IN_FILES))
@pytest.mark.parametrize("setting", VARIANT_SETTINGS, ids=[f"{s.section}.{s.key}" for s in VARIANT_SETTINGS])
def test_variant_setting_with_a_nasty_value(setting: object, value: str, tmp_path: Path) -> None:
    paths = Paths(tmp_path, tmp_path / "cache")
    (tmp_path / "variants").mkdir()
    base = {"Variant": {"Architectures": host_architecture()}, "Image": {"URL": "https://example.org/x.img"}}
    base.setdefault(setting.section, {})[setting.key] = value.replace("\n", "\n ")  # type: ignore[attr-defined]
    text = "".join(f"[{sec}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for sec, keys in base.items())
    (tmp_path / "variants" / "v.conf").write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        variant = load_variant("v", paths)
        for arch in variant.architectures:
            variant.image_for(arch)
    except UserError:
        pass
