"""The safety net under 'never print an OS parameter's value': whatever reaches stderr is scrubbed.

The messages themselves never carry values (tests/test_secrets.py runs the real scripts); this is
for what no message controls: an internal error's text, a DEBUG_LEVEL=1 traceback, a hook that
prints what it was given.
"""

from __future__ import annotations

import base64
import logging

import pytest

from instance_cloudimage.ganeti.simulate import simulated_core_environment
from instance_cloudimage.params.table import values_to_hide
from instance_cloudimage.runtime import log as logmod
from instance_cloudimage.runtime.log import redact
from instance_cloudimage.scripts import main as entry

PW = "$6$saltsaltsalt$" + "Q" * 86
KEY_BODY = "AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5Zm9ydGVzdGluZ29ubHkxMjM0NTY3ODkw"
USER_DATA = "#cloud-config\nruncmd:\n  - echo TOPSECRETRUNCMD\n"
PARAMS = {
    "password_hash": PW,
    "user_data": "base64:" + base64.b64encode(USER_DATA.encode()).decode(),
    "ssh_authorized_keys": f"ssh-ed25519 {KEY_BODY} someone@laptop",
    "image": "https://images.example.org/private/token=SEKRITTOKEN/x.img",
    "arch": "x86_64",
    "grow_root": "yes",
}


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logmod, "_hidden", [])  # what a test hides stays out of later tests' logs


def test_values_to_hide_covers_secret_and_private_parameters_only() -> None:
    hidden = values_to_hide(PARAMS)
    for needle in (PW, KEY_BODY, "echo TOPSECRETRUNCMD", PARAMS["image"], PARAMS["user_data"]):
        assert any(needle in h or h in needle for h in hidden), needle
    assert "x86_64" not in hidden and "yes" not in hidden


def test_redact_replaces_whole_values_lines_and_tokens() -> None:
    from instance_cloudimage.runtime.log import hide_values

    hide_values(values_to_hide(PARAMS))
    text = (f"boom {PW} and {KEY_BODY} and - echo TOPSECRETRUNCMD and {PARAMS['image']} "
            "on x86_64 with grow_root=yes")
    out = redact(text)
    for needle in (PW, KEY_BODY, "TOPSECRETRUNCMD", "SEKRITTOKEN"):
        assert needle not in out
    assert "x86_64" in out and "grow_root=yes" in out and "[hidden]" in out


@pytest.mark.parametrize("debug", ["0", "1"])
def test_an_internal_error_quoting_a_secret_is_scrubbed(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], debug: str) -> None:
    def buggy(*args: object) -> None:
        raise RuntimeError(f"unexpected {PW} in {PARAMS['image']}")

    monkeypatch.setattr(entry, "dispatch", buggy)
    env = simulated_core_environment("demo", params=PARAMS, debug=debug == "1")
    try:
        assert entry.os_script_main("verify", environ=env, argv=["/nonexistent/verify", "parameters"]) == entry.EXIT_BUG
    finally:
        logging.getLogger("instance_cloudimage").handlers.clear()
    err = capsys.readouterr().err
    assert "internal error: RuntimeError" in err and "Traceback" in err
    assert PW not in err and "SEKRITTOKEN" not in err and "[hidden]" in err
