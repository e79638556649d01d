"""No OS parameter's value ever reaches Ganeti's log: the installed scripts, run as Ganeti runs them.

Every parameter carries a distinctive value; create, verify, rename, export and import run with
DEBUG_LEVEL=0 and 1, on success and on failures at every stage (parameter checks, URL policy,
download, a hook, seeding), and their whole stdout+stderr must contain none of those values.
With DEBUG_LEVEL=1 a failure prints a traceback: its frames show code, and the exception texts
are scrubbed like every log line (log.redact), so the secret values stay out of it too.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.ganeti.env import Script
from instance_cloudimage.ganeti.simulate import SimulatedTransfer, simulated_core_environment, simulated_environment
from instance_cloudimage.runtime.siteconfig import Paths
from instance_cloudimage.sources.demo import build_demo_image
from tests.support import guest_images as gi
from tests.support.httpfixtures import Server, ServerState

pytestmark = pytest.mark.integration

PW_HASH = "$6$SaltPwSecret$" + ("HashBodySecret" * 7)[:86]
KEY_BODY = "AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5Zm9ydGVzdGluZ29ubHkxMjM0NTY3ODkw"
KEY = f"ssh-ed25519 {KEY_BODY} KeyCommentSecret@laptop"
USER_DATA = "#cloud-config\nruncmd:\n  - echo UserDataSecretCommand\n"
USER_DATA_B64 = "base64:" + base64.b64encode(USER_DATA.encode()).decode()
NEEDLES = ("SaltPwSecret", "HashBodySecret", KEY_BODY, "KeyCommentSecret", "UserDataSecretCommand",
           USER_DATA_B64[7:40], "ImageNameSecret", "UrlPathSecret", "UrlTokenSecret", "RedirectSecret")
ENV_DUMP_HOOK = "#!/bin/sh\nenv | sort\ncat \"$INSTANCE_JSON\"\nexit {rc}\n"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerState]:
    state = ServerState()
    srv = Server(state)
    state.redirects["/UrlPathSecret/x.img"] = state.url("/RedirectSecret/x.img?t=UrlTokenSecret")
    yield state
    srv.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("secrets")
    etc, cache, images = base / "etc", base / "cache", base / "images"
    for d in (etc / "variants", images):
        d.mkdir(parents=True)
    # TrustedDirectories: the hostile local image is to reach nocloud-fs, which only a trusted image gets.
    (etc / "defaults.conf").write_text(
        f"[Images]\nAllowedDirectories = {images}\nTrustedDirectories = {images}\n"
        "AllowedURLNetworks = 127.0.0.0/8\nAllowPlainHTTP = yes\n"
        "[HTTP]\nRetries = 0\nConnectTimeout = 5\n")
    for name in ("test", "hooked", "hookfails"):
        (etc / "variants" / f"{name}.conf").write_text(
            "[Variant]\nAgent = cloud-init\nDefaultUser = debian\nArchitectures = x86_64\n"
            "[Image]\nURL = builtin:demo\n")
    # A site hook that dumps everything it is given (PassSecrets is off: the private values still
    # reach it, and its output is scrubbed); in the second variant it fails, so its output also
    # ends up in the one-line error.
    for variant, rc in (("hooked", 0), ("hookfails", 1)):
        d = etc / "hooks.d" / "pre-write.d" / variant
        d.mkdir(parents=True)
        (d / "10-dump").write_text(ENV_DUMP_HOOK.format(rc=rc))
        (d / "10-dump").chmod(0o755)
    shutil.copy(build_demo_image("demo", cache), images / "ImageNameSecret.qcow2")
    hostile = gi.hostile(base / "hostile.raw", {"var/lib/cloud": "/tmp"})
    gi.sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", os.fspath(hostile),
          os.fspath(images / "HostileImageNameSecret.qcow2"))
    install_os(base / "os", Paths(etc, cache), python=sys.executable)
    return {"os": base / "os", "images": images, "base": base}


def all_params(site: Mapping[str, Path], **override: str) -> dict[str, str]:
    params = {
        "image": os.fspath(site["images"] / "ImageNameSecret.qcow2"),
        "ssh_authorized_keys": KEY,
        "password_hash": PW_HASH,
        "user_data": USER_DATA_B64,
        "hostname": "vm1.example.org",
        "dns_nameservers": "192.0.2.53",
        "network": "auto",
    }
    params.update(override)
    return {k: v for k, v in params.items() if v}


def ganeti_env(site: Mapping[str, Path], verb: str, debug: str, params: Mapping[str, str], *,
               variant: str = "test", disk: Path | None = None) -> dict[str, str]:
    if verb == "verify":
        return simulated_core_environment(variant, params=params, debug=debug == "1")
    assert disk is not None
    return simulated_environment(variant, [disk], instance_name="vm1.example.org", instance_uuid=str(uuid.uuid4()),
                                 nics=1, params=params, debug=debug == "1",
                                 old_name="vm0.example.org" if verb == "rename" else None,
                                 transfer=SimulatedTransfer(Script(verb)) if verb in ("export", "import") else None)


def run(site: Mapping[str, Path], verb: str, env: Mapping[str, str], stdin: bytes = b"") -> tuple[int, str]:
    argv = [os.fspath(site["os"] / verb)] + (["parameters"] if verb == "verify" else [])
    proc = subprocess.run(argv, env=dict(env), cwd=site["os"], input=stdin, capture_output=True, check=False,
                          timeout=300)
    return proc.returncode, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def assert_no_secret(output: str, debug: str) -> None:
    for needle in NEEDLES:
        assert needle not in output, f"{needle!r} leaked:\n{output}"
    if debug == "0":
        assert "Traceback" not in output, output


def fresh_disk(site: Mapping[str, Path], name: str = "disk0.img") -> Path:
    return gi.blank(site["base"] / name, 256)


DEBUG = pytest.mark.parametrize("debug", ["0", "1"])


@DEBUG
def test_a_successful_create_then_rename_export_import(site: dict[str, Path], debug: str) -> None:
    disk = fresh_disk(site)
    params = all_params(site)
    rc, out = run(site, "create", ganeti_env(site, "create", debug, params, variant="hooked", disk=disk))
    assert rc == 0, out
    assert "[hidden]" in out  # the hook printed the image path and the keys, which were scrubbed
    assert "OSP_PASSWORD_HASH" not in out and "OSP_USER_DATA" not in out  # secrets never reach hooks
    assert_no_secret(out, debug)
    # rename, export and import never get secret parameters from Ganeti, but do get private ones.
    private = all_params(site, password_hash="", user_data="")
    rc, out = run(site, "rename", ganeti_env(site, "rename", debug, private, disk=disk))
    assert rc == 0, out
    assert_no_secret(out, debug)
    rc, stream = run(site, "verify", ganeti_env(site, "verify", debug, params))
    assert rc == 0, stream
    assert_no_secret(stream, debug)
    proc = subprocess.run([os.fspath(site["os"] / "export")], env=ganeti_env(site, "export", debug, private, disk=disk),
                          cwd=site["os"], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert_no_secret(proc.stderr.decode(), debug)
    target = fresh_disk(site, "disk1.img")
    rc, out = run(site, "import", ganeti_env(site, "import", debug, private, disk=target), stdin=proc.stdout)
    assert rc == 0, out
    assert_no_secret(out, debug)


FAILURES = {
    "bad user_data": ({"user_data": "#cloud-config\nUserDataSecretCommand: [\n"}, "not valid YAML"),
    "bad password_hash": ({"password_hash": "HashBodySecret"}, "password_hash is not a crypt(3) hash"),
    "bad key": ({"ssh_authorized_keys": f"ssh-ed25519 {KEY_BODY[:-8]} KeyCommentSecret"}, "ssh_authorized_keys"),
    "malformed image URL": ({"image": "https://[UrlPathSecret:zz]/x.img"}, "image is not a valid URL"),
    "image outside the allowed directories": ({"image": "/var/tmp/ImageNameSecret.img"}, "outside the allowed"),
    "missing image file": ({"image": "{images}/ImageNameSecret-missing.img"}, "image path cannot be read"),
    "unknown parameter": ({"token": "UrlTokenSecret"}, "unknown OS parameter 'token'"),
}


@DEBUG
@pytest.mark.parametrize("case", list(FAILURES))
def test_parameter_failures_in_verify_and_create(site: dict[str, Path], debug: str, case: str) -> None:
    override, phrase = FAILURES[case]
    params = all_params(site, **{k: v.format(images=site["images"]) for k, v in override.items()})
    for verb in ("verify", "create"):
        rc, out = run(site, verb, ganeti_env(site, verb, debug, params, disk=fresh_disk(site)))
        assert rc == 1, out
        assert phrase in out.strip().splitlines()[-1], out
        assert_no_secret(out, debug)


@DEBUG
def test_download_failures_after_redirects(site: dict[str, Path], server: ServerState, debug: str) -> None:
    for image in (server.url("/UrlPathSecret/x.img"),  # redirected to a path that is not there
                  "http://127.0.0.1:9/UrlPathSecret/x.img?token=UrlTokenSecret"):  # connection refused
        params = all_params(site, image=image)
        rc, out = run(site, "create", ganeti_env(site, "create", debug, params, disk=fresh_disk(site)))
        assert rc == 1, out
        assert "the URL given by the image parameter" in out.strip().splitlines()[-1], out
        assert_no_secret(out, debug)


@DEBUG
def test_a_failing_hook_that_prints_its_environment(site: dict[str, Path], debug: str) -> None:
    rc, out = run(site, "create", ganeti_env(site, "create", debug, all_params(site), variant="hookfails",
                                             disk=fresh_disk(site)))
    assert rc == 1, out
    assert "pre-write hook" in out.strip().splitlines()[-1] and "failed with exit code 1" in out, out
    assert_no_secret(out, debug)


@DEBUG
def test_a_seeding_failure_after_the_image_was_written(site: dict[str, Path], debug: str) -> None:
    params = all_params(site, image=os.fspath(site["images"] / "HostileImageNameSecret.qcow2"))
    rc, out = run(site, "create", ganeti_env(site, "create", debug, params, disk=fresh_disk(site)))
    assert rc == 1, out
    assert "/var/lib/cloud is a symbolic link" in out.strip().splitlines()[-1], out
    assert_no_secret(out, debug)
