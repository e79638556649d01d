"""Hooks: discovery order, permission checks, the environment and JSON contract, pre-fetch results.

The hooks are real executables written into tmp directories and run by the real runner.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import textwrap
import types
from pathlib import Path

import pytest

from instance_cloudimage.ganeti.env import Script, parse_environment
from instance_cloudimage.ganeti.simulate import SimulatedDisk, simulated_environment
from instance_cloudimage.ganeti.variants import load_variant
from instance_cloudimage.hooks.facts import HookFacts
from instance_cloudimage.hooks.run import Phase, plan_hooks, run_hooks
from instance_cloudimage.params import table as params
from instance_cloudimage.runtime.errors import HookFailed, SeedError
from instance_cloudimage.runtime.siteconfig import SITE_SETTINGS, Paths, SiteConfig, load_site_config
from instance_cloudimage.sources.fetch import ImageRef

ROOT = os.geteuid() == 0


def write_hook(path: Path, body: str, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(mode)
    return path


def make_site(tmp_path: Path, **values: object) -> SiteConfig:
    config_dir = tmp_path / "etc"
    config_dir.mkdir(exist_ok=True)
    defaults = {s.dest: s.default for s in SITE_SETTINGS}
    defaults.update(values)
    return SiteConfig(paths=Paths(config_dir, tmp_path / "cache"), values=defaults)


def make_facts(tmp_path: Path, site: SiteConfig, osp: dict[str, str] | None = None,
               variant: str = "demo") -> HookFacts:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 1 << 20)
    environ = simulated_environment(
        variant, [SimulatedDisk(disk, size_mib=1)], instance_name="web1.example.org",
        instance_uuid="8c1f0e4e-1111-2222-3333-444455556666", nics=["aa:00:00:11:22:33"], params=osp) | {
        # What a live cluster also passes (Appendix A), which the hooks see too.
        "INSTANCE_PRIMARY_NODE": "node-uuid", "INSTANCE_SECONDARY_NODES": "", "INSTANCE_BE_maxmem": "1024",
        "INSTANCE_HV_serial_console": "True", "DISK_0_UUID": "disk-uuid", "NIC_0_MODE": "bridged",
        "NIC_0_LINK": "br0", "NIC_0_BRIDGE": "br0", "NIC_0_IP": "192.0.2.10", "NIC_0_NETWORK_NAME": "net1",
        "NIC_0_NETWORK_SUBNET": "192.0.2.0/24", "NIC_0_NETWORK_GATEWAY": "192.0.2.1", "NIC_0_NETWORK_TAGS": "a b",
    }
    genv = parse_environment(environ, Script.CREATE)
    instance = genv.require_instance()
    v = load_variant(variant, site.paths)
    ref = ImageRef(location="https://images.example.org/demo.qcow2", declared_format="qcow2",
                   checksum="sha256:" + "a" * 64, checksum_url="https://images.example.org/SHA256SUMS")
    return HookFacts(genv, instance, v, "x86_64", instance.disks[0], site.paths.config_dir, ref)


@pytest.fixture
def shipped(tmp_path: Path) -> Path:
    d = tmp_path / "shipped"
    d.mkdir()
    return d


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def recorder(log: Path, label: str) -> str:
    return f'echo "{label}" >> {log}\n'


# --- order and overrides -----------------------------------------------------------------------

def test_merged_order_overrides_and_masks(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "order.log"
    sh = shipped / "post.d"
    write_hook(sh / "10-a", recorder(out, "shipped:10-a"))
    write_hook(sh / "20-b", recorder(out, "shipped:20-b"))
    write_hook(sh / "30-c", recorder(out, "shipped:30-c"))
    write_hook(sh / "40-m", recorder(out, "shipped:40-m"))
    write_hook(sh / "demo" / "20-b", recorder(out, "shipped-variant:20-b"))
    write_hook(sh / "demo" / "25-v", recorder(out, "shipped-variant:25-v"))
    write_hook(sh / "debian-12" / "26-other", recorder(out, "other-variant"))
    st = site.paths.site_hooks / "post.d"
    write_hook(st / "15-x", recorder(out, "site:15-x"))
    write_hook(st / "30-c", recorder(out, "site:30-c"))
    write_hook(st / "demo" / "05-v", recorder(out, "site-variant:05-v"))
    write_hook(st / "demo" / "15-x", recorder(out, "site-variant:15-x"))
    (st / "40-m").symlink_to("/dev/null")
    write_hook(st / "foo.sh", recorder(out, "site:foo.sh"))

    plan = plan_hooks(site.paths, "demo", shipped=shipped)
    run_hooks(plan, Phase.POST, make_facts(tmp_path, site), site)
    assert out.read_text().split() == [
        "site-variant:05-v", "shipped:10-a", "site-variant:15-x", "shipped-variant:20-b",
        "shipped-variant:25-v", "site:30-c", "site:foo.sh",
    ]


def test_shipped_hook_declaring_confdata_is_planned_only_when_configured(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "ran.log"
    decl = "# instance-cloudimage-confdata: thing\n"
    write_hook(shipped / "post-write.d" / "50-declared", decl + recorder(out, "declared"))
    write_hook(shipped / "post-write.d" / "60-plain", recorder(out, "plain"))
    write_hook(site.paths.site_hooks / "post-write.d" / "70-site", decl + recorder(out, "site"))

    names = [h.name for h in plan_hooks(site.paths, "demo", shipped=shipped).for_phase(Phase.POST_WRITE)]
    assert names == ["60-plain", "70-site"]  # a site hook's declaration means nothing

    (site.paths.site_hooks / "confdata").mkdir()
    (site.paths.site_hooks / "confdata" / "thing").write_text("")
    names = [h.name for h in plan_hooks(site.paths, "demo", shipped=shipped).for_phase(Phase.POST_WRITE)]
    assert names == ["50-declared", "60-plain", "70-site"]


def test_the_shipped_examples_are_left_out_until_configured(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    plan = plan_hooks(site.paths, "demo")
    assert all(not plan.for_phase(p) for p in Phase)
    confdata = site.paths.site_hooks / "confdata"
    confdata.mkdir(parents=True)
    (confdata / "serial-console").write_text("")
    (confdata / "files").mkdir()
    plan = plan_hooks(site.paths, "demo")
    assert [h.name for h in plan.for_phase(Phase.POST_WRITE)] == ["50-install-files", "60-serial-console"]
    assert not plan.for_phase(Phase.PRE_FETCH)


def test_byte_order_of_names(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "order.log"
    for name in ("b", "B", "_x", "10", "9", "a.b", "a-b"):
        write_hook(shipped / "pre-write.d" / name, recorder(out, name))
    run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.PRE_WRITE, make_facts(tmp_path, site), site)
    assert out.read_text().split() == ["10", "9", "B", "_x", "a-b", "a.b", "b"]


def test_skipped_names(tmp_path: Path, shipped: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "order.log"
    d = site.paths.site_hooks / "pre-write.d"
    skipped = ["foo~", "foo.bak", "foo.orig", "foo.swp", "foo.dpkg-old", "foo.dpkg-dist", "foo.rpmnew",
               "foo.rpmsave", "foo.ucf-dist", "#foo#", ".hidden", "with space", "ünï"]
    for name in skipped:
        write_hook(d / name, recorder(out, name))
    for name in ("foo.sh", "bar.py", "run_me", "x.y.z"):
        write_hook(d / name, recorder(out, name))
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        plan = plan_hooks(site.paths, "demo", shipped=shipped)
    run_hooks(plan, Phase.PRE_WRITE, make_facts(tmp_path, site), site)
    assert out.read_text().split() == ["bar.py", "foo.sh", "run_me", "x.y.z"]
    assert "skipping" in caplog.text and "with space" in caplog.text and "foo.dpkg-old" in caplog.text


def test_no_hook_directories_is_fine(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    plan = plan_hooks(site.paths, "demo", shipped=tmp_path / "nowhere")
    assert all(not plan.for_phase(p) for p in Phase)
    facts = make_facts(tmp_path, site)
    assert run_hooks(plan, Phase.PRE_FETCH, facts, site) is facts.image


def test_misnamed_phase_directory_warns(tmp_path: Path, shipped: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = make_site(tmp_path)
    write_hook(site.paths.site_hooks / "postwrite.d" / "10-x", "exit 0\n")
    with caplog.at_level(logging.WARNING, logger="instance_cloudimage"):
        plan_hooks(site.paths, "demo", shipped=shipped)
    assert "postwrite.d is not a hook directory" in caplog.text


# --- refused hooks and directories ---------------------------------------------------------------

def test_non_executable_site_hook_is_refused_before_anything_runs(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "ran"
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "10-ok", f"touch {out}\n")
    write_hook(site.paths.site_hooks / "post.d" / "50-lazy", "exit 0\n", mode=0o644)
    with pytest.raises(HookFailed, match=r"post hook .*50-lazy is refused: it is not executable"):
        plan_hooks(site.paths, "demo", shipped=shipped)
    assert not out.exists()


def test_non_executable_shipped_hook_is_refused(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    write_hook(shipped / "post.d" / "50-lazy", "exit 0\n", mode=0o644)
    with pytest.raises(HookFailed, match="not executable"):
        plan_hooks(site.paths, "demo", shipped=shipped)


@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_group_or_world_writable_hook_is_refused(tmp_path: Path, shipped: Path, mode: int) -> None:
    site = make_site(tmp_path)
    hook = write_hook(site.paths.site_hooks / "pre-write.d" / "10-x", "exit 0\n")
    hook.chmod(mode)
    with pytest.raises(HookFailed, match="writable by group or others"):
        plan_hooks(site.paths, "demo", shipped=shipped)


@pytest.mark.parametrize("which", ["root", "phase", "variant"])
def test_group_writable_directory_is_refused(tmp_path: Path, shipped: Path, which: str) -> None:
    site = make_site(tmp_path)
    hook = write_hook(site.paths.site_hooks / "pre-write.d" / "demo" / "10-x", "exit 0\n")
    directory = {"root": site.paths.site_hooks, "phase": hook.parent.parent, "variant": hook.parent}[which]
    directory.chmod(0o775)
    with pytest.raises(HookFailed, match=f"hook directory {directory} is refused: it is writable"):
        plan_hooks(site.paths, "demo", shipped=shipped)


def test_symlinked_hook_into_writable_directory_is_refused(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    loose = tmp_path / "loose"
    write_hook(loose / "real", "exit 0\n")
    loose.chmod(0o777)
    d = site.paths.site_hooks / "pre-write.d"
    d.mkdir(parents=True)
    (d / "10-link").symlink_to(loose / "real")
    with pytest.raises(HookFailed, match=f"hook directory {loose} is refused"):
        plan_hooks(site.paths, "demo", shipped=shipped)


@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="chown needs root")
def test_hook_not_owned_by_root_is_refused(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    hook = write_hook(site.paths.site_hooks / "pre-write.d" / "10-x", "exit 0\n")
    os.chown(hook, 65534, 65534)
    with pytest.raises(HookFailed, match="10-x is refused: it is owned by uid 65534, not root"):
        plan_hooks(site.paths, "demo", shipped=shipped)
    os.chown(hook, 0, 0)
    link = hook.parent / "20-link"
    link.symlink_to(hook)
    os.chown(link, 65534, 65534, follow_symlinks=False)
    with pytest.raises(HookFailed, match="20-link is refused: its symlink is owned by uid 65534"):
        plan_hooks(site.paths, "demo", shipped=shipped)
    link.unlink()
    os.chown(hook, 0, 0)
    os.chown(hook.parent, 65534, 65534)
    with pytest.raises(HookFailed, match=f"hook directory {hook.parent} is refused: it is owned by uid 65534"):
        plan_hooks(site.paths, "demo", shipped=shipped)


# --- running: failure, timeout, output ----------------------------------------------------------

def test_failure_names_the_hook_and_its_last_lines(tmp_path: Path, shipped: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    site = make_site(tmp_path)
    write_hook(site.paths.site_hooks / "pre-write.d" / "20-broken",
               "for i in 1 2 3 4 5 6 7 8; do echo line$i; done\necho oops >&2\nexit 3\n")
    plan = plan_hooks(site.paths, "demo", shipped=shipped)
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"), pytest.raises(HookFailed) as exc:
        run_hooks(plan, Phase.PRE_WRITE, make_facts(tmp_path, site), site)
    msg = str(exc.value)
    assert "pre-write hook" in msg and "20-broken failed with exit code 3" in msg
    assert msg.endswith("last output: line5 | line6 | line7 | line8 | oops")
    assert "\n" not in msg
    # Every line went to the log, prefixed with the hook's name.
    assert "[pre-write 20-broken] line1" in caplog.text and "[pre-write 20-broken] oops" in caplog.text


def test_script_without_interpreter_line(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    hook = site.paths.site_hooks / "post.d" / "10-noshebang"
    hook.parent.mkdir(parents=True)
    hook.write_text("echo hi\n")
    hook.chmod(0o755)
    with pytest.raises(HookFailed, match="10-noshebang cannot be run: Exec format error .*#! line"):
        run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site), site)
    hook.write_text("#!/no/such/interpreter\necho hi\n")
    with pytest.raises(HookFailed, match="10-noshebang cannot be run: the interpreter on its #! line does not exist"):
        run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site), site)


def test_killed_by_signal(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    write_hook(site.paths.site_hooks / "post.d" / "10-x", "kill -SEGV $$\n")
    with pytest.raises(HookFailed, match="was killed by SIGSEGV; last output: no output"):
        run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site), site)


def test_timeout_kills_the_hook_and_its_children(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path, hook_timeout=1.0)
    pidfile = tmp_path / "child.pid"
    write_hook(site.paths.site_hooks / "pre-write.d" / "10-slow",
               f"echo started\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    plan = plan_hooks(site.paths, "demo", shipped=shipped)
    with pytest.raises(HookFailed, match=r"10-slow timed out after 1s; last output: started") as exc:
        run_hooks(plan, Phase.PRE_WRITE, make_facts(tmp_path, site), site)
    assert "[Hooks] Timeout" in str(exc.value)
    assert not alive(int(pidfile.read_text()))


def test_background_child_holding_output_does_not_hang(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path, hook_timeout=30.0)
    write_hook(site.paths.site_hooks / "post.d" / "10-daemon", "sleep 60 &\necho done\nexit 0\n")
    run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site), site)


def test_hook_that_closes_its_output_keeps_running(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "finished"
    write_hook(site.paths.site_hooks / "post.d" / "10-quiet", f"exec >/dev/null 2>&1\nsleep 1\ntouch {out}\n")
    run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site), site)
    assert out.exists()


# --- the contract: environment and JSON ---------------------------------------------------------

DUMP = """\
env > "{out}/$HOOK_PHASE.env"
cp "$INSTANCE_JSON" "{out}/$HOOK_PHASE.json"
"""


def dump_all_phases(tmp_path: Path, site: SiteConfig) -> Path:
    out = tmp_path / "dump"
    out.mkdir()
    for phase in Phase:
        write_hook(site.paths.site_hooks / f"{phase.value}.d" / "10-dump", DUMP.format(out=out))
    return out


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_environment_and_json(tmp_path: Path, shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAKED_FROM_OUR_ENVIRONMENT", "1")
    site = make_site(tmp_path)
    out = dump_all_phases(tmp_path, site)
    plan = plan_hooks(site.paths, "demo", shipped=shipped)
    facts = make_facts(tmp_path, site, osp={"image_checksum": "sha256:" + "b" * 64})
    run_hooks(plan, Phase.PRE_FETCH, facts, site)
    image = tmp_path / "scratch.img"
    run_hooks(plan, Phase.PRE_WRITE, HookFacts(**{**facts.__dict__, "image_path": image, "image_format": "qcow2",
                                                   "image_virtual_size": 1 << 20}), site)

    env = read_env(out / "pre-fetch.env")
    assert "LEAKED_FROM_OUR_ENVIRONMENT" not in env
    assert env["HOOK_PHASE"] == "pre-fetch" and env["VARIANT"] == "demo" and env["ARCH"] == "x86_64"
    assert env["OS_NAME"] == "cloudimage" and env["OS_VARIANT"] == "demo" and env["OS_API_VERSION"] == "20"
    assert env["INSTANCE_NAME"] == "web1.example.org" and env["INSTANCE_OS"] == "cloudimage+demo"
    assert env["INSTANCE_BE_maxmem"] == "1024" and env["INSTANCE_HV_serial_console"] == "True"
    assert env["DISK_COUNT"] == "1" and env["DISK_0_PATH"] == facts.disk.path and env["DISK_0_SIZE"] == "1"
    assert env["DISK_0_BACKEND_TYPE"] == "file:loop"
    assert env["NIC_COUNT"] == "1" and env["NIC_0_MAC"] == "aa:00:00:11:22:33" and env["NIC_0_IP"] == "192.0.2.10"
    assert env["NIC_0_NETWORK_SUBNET"] == "192.0.2.0/24" and env["NIC_0_NETWORK_TAGS"] == "a b"
    assert env["OSP_IMAGE_CHECKSUM"] == "sha256:" + "b" * 64
    assert env["BLOCKDEV"] == facts.disk.path
    assert env["IMAGE_URL"] == "https://images.example.org/demo.qcow2"
    assert env["CONFIG_DIR"] == os.fspath(site.paths.config_dir)
    assert env["CONFDATA"] == os.fspath(site.paths.site_hooks / "confdata")
    assert "HOOK_RESULT" in env and env["INSTANCE_JSON"].endswith("instance.json")
    for absent in ("TARGET", "ROOT_PARTITION", "IMAGE_PATH", "IMAGE_FORMAT"):
        assert absent not in env

    env = read_env(out / "pre-write.env")
    assert env["IMAGE_PATH"] == os.fspath(image) and env["IMAGE_FORMAT"] == "qcow2"
    assert "HOOK_RESULT" not in env and "TARGET" not in env

    doc = json.loads((out / "pre-write.json").read_text())
    assert doc["version"] == 1 and doc["phase"] == "pre-write"
    assert doc["instance"]["name"] == "web1.example.org" and doc["instance"]["be"] == {"maxmem": "1024"}
    assert doc["disks"] == [{"index": 0, "path": facts.disk.path, "uri": None, "size_mib": 1, "access": "rw",
                             "backend_type": "file:loop", "uuid": "disk-uuid", "name": None}]
    nic = doc["nics"][0]
    assert nic["mac"] == "aa:00:00:11:22:33" and nic["ip"] == "192.0.2.10" and not nic["communication"]
    assert nic["network"]["gateway"] == "192.0.2.1" and nic["network"]["tags"] == ["a", "b"]
    assert doc["variant"]["name"] == "demo" and doc["variant"]["agent"] == "cloud-init"
    assert doc["image"] == {"location": "https://images.example.org/demo.qcow2", "declared_format": "qcow2",
                            "checksum": "sha256:" + "a" * 64, "from_parameter": False, "path": os.fspath(image),
                            "format": "qcow2", "virtual_size": 1 << 20}
    assert doc["parameters"] == {"image_checksum": "sha256:" + "b" * 64}
    assert doc["target"] is None and doc["blockdev"] == facts.disk.path


def test_json_file_is_private_and_removed(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    out = tmp_path / "mode"
    write_hook(site.paths.site_hooks / "post.d" / "10-x",
               f'stat -c %a "$INSTANCE_JSON" > {out}\nstat -c %a "$(dirname "$INSTANCE_JSON")" >> {out}\n'
               f'echo "$INSTANCE_JSON" >> {out}\n')
    run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site), site)
    file_mode, dir_mode, path = out.read_text().split()
    assert (file_mode, dir_mode) == ("600", "700")
    assert not Path(path).exists()


SECRETS = {"user_data": "#cloud-config\nfoo: secret-ud", "password_hash": "$6$secret-pw",
           "api_token": "secret-token", "image_checksum": "sha256:" + "c" * 64}


@pytest.fixture
def declared_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = params.Parameter("api_token", "a declared secret", lambda v, s: None, secret=True)
    monkeypatch.setattr(params, "PARAMETERS", (*params.PARAMETERS, extra))
    import instance_cloudimage.hooks.facts as hookenv

    monkeypatch.setattr(hookenv, "PARAMETERS", params.PARAMETERS)


@pytest.mark.usefixtures("declared_secret")
def test_secrets_are_withheld_by_default(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    out = dump_all_phases(tmp_path, site)
    run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site, SECRETS), site)
    env_text = (out / "post.env").read_text()
    json_text = (out / "post.json").read_text()
    for secret in ("secret-ud", "secret-pw", "secret-token"):
        assert secret not in env_text and secret not in json_text
    env = read_env(out / "post.env")
    assert "OSP_USER_DATA" not in env and "OSP_PASSWORD_HASH" not in env and "OSP_API_TOKEN" not in env
    assert env["OSP_IMAGE_CHECKSUM"] == "sha256:" + "c" * 64
    doc = json.loads(json_text)
    assert doc["withheld_parameters"] == ["api_token", "password_hash", "user_data"]
    assert doc["parameters"] == {"image_checksum": "sha256:" + "c" * 64}


@pytest.mark.usefixtures("declared_secret")
def test_secrets_are_passed_when_the_site_says_so(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path, hooks_pass_secrets=True)
    out = dump_all_phases(tmp_path, site)
    run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.POST, make_facts(tmp_path, site, SECRETS), site)
    doc = json.loads((out / "post.json").read_text())
    assert doc["parameters"] == SECRETS and doc["withheld_parameters"] == []
    env = read_env(out / "post.env")
    assert env["OSP_PASSWORD_HASH"] == "$6$secret-pw" and env["OSP_API_TOKEN"] == "secret-token"


def test_pass_secrets_site_config_key(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "defaults.conf").write_text("[Hooks]\nPassSecrets = yes\nTimeout = 5\n")
    site = load_site_config(Paths(etc, tmp_path / "cache"))
    assert site.get("hooks_pass_secrets") is True and site.get("hook_timeout") == 5.0


# --- pre-fetch: veto and replacement ------------------------------------------------------------

def test_veto(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "10-policy",
               'echo "images from $IMAGE_URL are not allowed here" >&2\nexit 1\n')
    with pytest.raises(HookFailed, match="10-policy failed with exit code 1; last output: images from "
                                         "https://images.example.org/demo.qcow2 are not allowed here"):
        run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.PRE_FETCH, make_facts(tmp_path, site), site)


def test_replacement_keeps_verification_and_chains(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path)
    seen = tmp_path / "seen"
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "10-mirror",
               'echo "image=https://mirror.example.net/demo.qcow2" >> "$HOOK_RESULT"\n')
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "20-see", f'echo "$IMAGE_URL" > {seen}\n')
    new = run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.PRE_FETCH, make_facts(tmp_path, site), site)
    assert new.location == "https://mirror.example.net/demo.qcow2"
    assert new.checksum == "sha256:" + "a" * 64 and new.checksum_url == "https://images.example.org/SHA256SUMS"
    assert new.declared_format == "qcow2"
    assert seen.read_text().strip() == new.location  # later hooks see the replacement


def test_replacement_with_checksum_and_format(tmp_path: Path, shipped: Path) -> None:
    site = make_site(tmp_path, allowed_dirs=(os.fspath(tmp_path / "images"),))
    local = tmp_path / "images" / "other.raw"
    local.parent.mkdir()
    local.write_bytes(b"\0" * 512)
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "10-swap",
               f'cat >> "$HOOK_RESULT" <<EOF\n# a comment\nimage={local}\nimage_checksum=SHA256:{"d" * 64}\n'
               'image_format=raw\nEOF\n')
    new = run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.PRE_FETCH, make_facts(tmp_path, site), site)
    assert (new.location, new.checksum, new.declared_format) == (os.fspath(local), "sha256:" + "d" * 64, "raw")
    assert new.checksum_url is None and new.signature_url is None


@pytest.mark.parametrize("line, match", [
    ("image=/etc/shadow", "named an image that is refused: image path points into /etc"),
    ("image=/srv/elsewhere/x.img", "named an image that is refused"),
    ("image=ftp://example.org/x.img", "refused: image URL scheme 'ftp' is not supported"),
    ("image_checksum=md5:abc", "refused: image_checksum must be"),
    ("image_format=iso", "unknown image_format"),
    ("url=https://example.org/x", "invalid line 1"),
])
def test_bad_replacement_is_refused(tmp_path: Path, shipped: Path, line: str, match: str) -> None:
    site = make_site(tmp_path, allowed_dirs=(os.fspath(tmp_path / "images"),))
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "10-bad", f'echo "{line}" >> "$HOOK_RESULT"\n')
    with pytest.raises(HookFailed, match=match):
        run_hooks(plan_hooks(site.paths, "demo", shipped=shipped), Phase.PRE_FETCH, make_facts(tmp_path, site), site)


# --- create: the phases in the pipeline -----------------------------------------------------------

@pytest.fixture
def fake_guestfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The seam for the guest mount: a real directory stands in for the mounted root."""
    root = tmp_path / "guest-root"
    root.mkdir()

    def mount_guest_root(disk_path: str, stack: object, arch: str) -> object:
        return types.SimpleNamespace(path=root, device="/dev/loop-fake")

    monkeypatch.setattr("instance_cloudimage.verbs.create.mount_guest_root", mount_guest_root)
    return root


def create_env(tmp_path: Path) -> dict[str, str]:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    return simulated_environment("demo", [disk], instance_name="i1.example")


PHASE_PROBE = 'echo "$HOOK_PHASE target=${{TARGET:-unset}} root=${{ROOT_PARTITION:-unset}}" >> {out}\n'


def test_create_runs_every_phase_with_target_only_in_post_write(tmp_path: Path, fake_guestfs: Path) -> None:
    from instance_cloudimage.verbs.create import run_create

    site = make_site(tmp_path)
    out = tmp_path / "phases"
    for phase in Phase:
        write_hook(site.paths.site_hooks / f"{phase.value}.d" / "10-probe", PHASE_PROBE.format(out=out))
    write_hook(site.paths.site_hooks / "post-write.d" / "20-touch", 'echo hello > "$TARGET/from-hook"\n')
    genv = parse_environment(create_env(tmp_path), Script.CREATE)
    run_create(genv, site, plan=plan_hooks(site.paths, "demo", shipped=tmp_path / "none"))
    assert out.read_text().splitlines() == [
        "pre-fetch target=unset root=unset",
        "pre-write target=unset root=unset",
        f"post-write target={fake_guestfs} root=/dev/loop-fake",
        "post target=unset root=unset",
    ]
    assert (fake_guestfs / "from-hook").read_text() == "hello\n"


def test_post_write_without_a_guest_root_warns_and_unsets_target(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from instance_cloudimage.verbs.create import run_create

    def no_root(disk_path: str, stack: object, arch: str) -> object:
        raise SeedError("no Linux root filesystem found on the disk")

    monkeypatch.setattr("instance_cloudimage.verbs.create.mount_guest_root", no_root)
    site = make_site(tmp_path)
    out = tmp_path / "phases"
    write_hook(site.paths.site_hooks / "post-write.d" / "10-probe", PHASE_PROBE.format(out=out))
    genv = parse_environment(create_env(tmp_path), Script.CREATE)
    with caplog.at_level(logging.WARNING, logger="instance_cloudimage"):
        run_create(genv, site, plan=plan_hooks(site.paths, "demo", shipped=tmp_path / "none"))
    assert out.read_text() == "post-write target=unset root=unset\n"
    assert "TARGET is unset" in caplog.text


def test_create_veto_leaves_the_disk_untouched(tmp_path: Path) -> None:
    from instance_cloudimage.verbs.create import run_create

    site = make_site(tmp_path)
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "10-no", "echo no >&2; exit 1\n")
    env = create_env(tmp_path)
    genv = parse_environment(env, Script.CREATE)
    with pytest.raises(HookFailed, match="10-no failed"):
        run_create(genv, site, plan=plan_hooks(site.paths, "demo", shipped=tmp_path / "none"))
    fd = os.open(env["DISK_0_PATH"], os.O_RDONLY)
    try:
        with pytest.raises(OSError):  # ENXIO: no data anywhere, the disk is one hole
            os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)


def test_create_with_replaced_local_image(tmp_path: Path) -> None:
    """A pre-fetch hook names a local raw image: it is verified, detected and written."""
    from instance_cloudimage.verbs.create import run_create

    images = tmp_path / "images"
    images.mkdir()
    raw = images / "tiny.raw"
    payload = os.urandom(1 << 20)
    raw.write_bytes(payload)
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    site = make_site(tmp_path, allowed_dirs=(os.fspath(images),))
    write_hook(site.paths.site_hooks / "pre-fetch.d" / "10-local",
               f'printf "image=%s\\nimage_checksum=sha256:%s\\nimage_format=raw\\n" {raw} {digest} > "$HOOK_RESULT"\n')
    env = create_env(tmp_path) | {"OSP_SEED": "none"}  # random bytes: no guest filesystem to seed
    run_create(parse_environment(env, Script.CREATE), site,
               plan=plan_hooks(site.paths, "demo", shipped=tmp_path / "none"))
    with open(env["DISK_0_PATH"], "rb") as f:
        assert f.read(len(payload)) == payload


def test_shipped_hooks_are_executable_and_inert(tmp_path: Path) -> None:
    """The real shipped hooks.d: every hook passes the checks, and does nothing without its data.

    The plan leaves an unconfigured example out; the hooks are inert on their own as well, for a
    site that copies one into its own directory."""
    from instance_cloudimage.hooks.run import HookPlan, find_hooks, hook_roots

    site = make_site(tmp_path)
    enabled = tmp_path / "all-enabled"
    for entry in ("local-mirror", "files", "serial-console"):
        (enabled / entry).mkdir(parents=True)
    roots = [r for r in hook_roots(site.paths) if r[0] == "shipped"]
    plan = HookPlan({p: find_hooks(p, "demo", roots, enabled) for p in Phase})
    names = {h.name for p in Phase for h in plan.for_phase(p)}
    assert names == {"50-local-mirror", "50-install-files", "60-serial-console"}
    for hook in (h for p in Phase for h in plan.for_phase(p)):
        assert os.stat(hook.path).st_mode & stat.S_IXUSR
    facts = make_facts(tmp_path, site)  # its CONFDATA holds nothing
    for phase in Phase:
        assert run_hooks(plan, phase, facts, site) == facts.image


def test_a_replaced_variant_image_is_logged_without_credentials(caplog: pytest.LogCaptureFixture) -> None:
    from instance_cloudimage.hooks.run import Hook, parse_pre_fetch_result

    hook = Hook(Phase.PRE_FETCH, "10-mirror", Path("/etc/x/pre-fetch.d/10-mirror"), "site")
    image = ImageRef(location="https://cloud.example.org/x.img", declared_format="auto", checksum=None,
                     variant="v")
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        new = parse_pre_fetch_result(hook, "image=https://mirror:PASSWORD@mirror.example.org/x.img\n", image,
                                     SiteConfig())
    assert new.location == "https://mirror:PASSWORD@mirror.example.org/x.img"
    assert "replaced the image with https://mirror.example.org/x.img" in caplog.text
    assert "PASSWORD" not in caplog.text
