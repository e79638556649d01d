"""reseedplan: what an import changes in a seed (new MACs, name, instance-id iff needed), on the files
create builds."""

from __future__ import annotations

import json
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import pytest
import yaml

from instance_cloudimage.ganeti.env import Script, parse_environment
from instance_cloudimage.ganeti.variants import Variant
from instance_cloudimage.runtime.errors import SeedError
from instance_cloudimage.runtime.siteconfig import SITE_SETTINGS, SiteConfig
from instance_cloudimage.seed.configdrive import build_configdrive
from instance_cloudimage.seed.content import build_nocloud, seed_input
from instance_cloudimage.seed.reseedplan import (
    choose_instance_id,
    keep_instance_id,
    macs_in,
    network_applied_every_boot,
    network_differs,
    plan_configdrive,
    plan_nocloud,
)
from tests.seed.test_reseed import NEW_MAC, NEW_UUID, OLD_MACS, OLD_UUID, env_of
from tests.support import delivery_helpers as dh

# --- decisions ----------------------------------------------------------------------------------------

def test_network_differs_compares_data_not_formatting() -> None:
    v2 = b"version: 2\nethernets:\n  eth0:\n    match: {macaddress: 'aa:00:00:00:00:00'}\n    set-name: eth0\n"
    same = yaml.safe_dump(yaml.safe_load(v2), default_flow_style=False).encode()
    assert same != v2 and not network_differs(v2, same)
    assert network_differs(v2, v2.replace(b"aa:00:00:00:00:00", NEW_MAC.encode()))
    assert not network_differs(None, None)
    assert network_differs(v2, None) and network_differs(None, v2)
    assert network_differs(b"{not yaml", v2)


def test_macs_in_every_network_format() -> None:
    v2 = {"version": 2, "ethernets": {"eth0": {"match": {"macaddress": "AA:00:00:00:00:01"}, "set-name": "eth0"}}}
    v1 = {"version": 1, "config": [{"type": "physical", "name": "eth0", "mac_address": "aa:00:00:00:00:02"}]}
    nd = {"links": [{"id": "eth0", "ethernet_mac_address": "aa:00:00:00:00:03"}], "networks": []}
    assert macs_in(yaml.safe_dump(v2).encode()) == ("aa:00:00:00:00:01",)
    assert macs_in(yaml.safe_dump({"network": v1}).encode()) == ("aa:00:00:00:00:02",)
    assert macs_in(json.dumps(nd).encode()) == ("aa:00:00:00:00:03",)
    assert macs_in(None) == () and macs_in(b"- a list") == ()


def test_network_applied_every_boot_from_user_data() -> None:
    every = b"#cloud-config\nupdates:\n  network:\n    when: [boot]\n"
    assert network_applied_every_boot(every)
    assert network_applied_every_boot(every.replace(b"[boot]", b"['boot-legacy', hotplug]"))
    assert not network_applied_every_boot(every.replace(b"[boot]", b"[boot-new-instance]"))
    assert not network_applied_every_boot(b"#!/bin/sh\n# updates: network: when: [boot]\n")
    assert not network_applied_every_boot(None)
    msg = MIMEMultipart()
    msg.attach(MIMEText("#!/bin/sh\necho hi\n", "x-shellscript"))
    msg.attach(MIMEText(every.decode(), "cloud-config", "utf-8"))  # base64-encoded part
    assert network_applied_every_boot(msg.as_bytes())


@pytest.mark.parametrize(("changed", "agent", "keep", "every_boot", "current", "expected"), [
    (False, "cloud-init", False, False, "old", "old"),
    (True, "cloud-init", False, False, "old", "cand"),
    (True, "cloud-init", False, False, "cand", "fresh"),  # the seed has the new UUID already
    (True, "cloud-init", False, False, None, "cand"),
    (True, "flamingo", False, False, "old", "old"),
    (True, "cloud-init", True, False, "old", "old"),
    (True, "cloud-init", False, True, "old", "old"),
    (True, "cloud-init", True, True, "old", "old"),
    (False, "cloud-init", False, False, None, None),
])
def test_instance_id_changes_only_for_a_changed_network_cloud_init_would_ignore(
        changed: bool, agent: str, keep: bool, every_boot: bool, current: str | None, expected: str | None) -> None:
    new, why = choose_instance_id(current, "cand", "fresh", network_changed=changed, agent=agent, keep=keep,
                                  every_boot=every_boot)
    assert new == expected and why


def test_keep_instance_id_parameter_overrides_the_site() -> None:
    site_keeps = SiteConfig(values={s.dest: s.default for s in SITE_SETTINGS} | {"import_keep_instance_id": True})
    assert not keep_instance_id({}, SiteConfig()) and keep_instance_id({}, site_keeps)
    assert keep_instance_id({"keep_instance_id": "yes"}, SiteConfig())
    assert not keep_instance_id({"keep_instance_id": "no"}, site_keeps)
    with pytest.raises(SeedError, match="keep_instance_id must be yes or no"):
        keep_instance_id({"keep_instance_id": "maybe"}, SiteConfig())


# --- plans on the files create builds ------------------------------------------------------------------

@pytest.fixture
def variant(tmp_path: Path) -> Variant:
    return dh.make_variant(tmp_path / "etc")


def inputs(tmp_path: Path, variant: Variant, **kw: Any) -> Any:
    disk = tmp_path / "d0"
    disk.touch()
    return seed_input(parse_environment(env_of([disk], **kw), Script.CREATE), variant, nonce="test")


def test_plan_nocloud_for_new_macs(tmp_path: Path, variant: Variant) -> None:
    old = dict(build_nocloud(inputs(tmp_path, variant, params={"ssh_authorized_keys": dh.KEY})).files)
    new_inp = inputs(tmp_path, variant, macs=[NEW_MAC], instance_uuid=NEW_UUID, name="vm2.example.org")
    update = plan_nocloud(old, new_inp, keep=False)
    assert set(update.write) == {"meta-data", "network-config"} and update.remove == ()
    assert update.write["network-config"] == build_nocloud(new_inp).files["network-config"]
    md = yaml.safe_load(update.write["meta-data"])
    assert md == {"instance-id": NEW_UUID, "local-hostname": "vm2.example.org", "public-keys": [dh.KEY]}
    assert (update.old_macs, update.new_macs, update.old_id) == (OLD_MACS, (NEW_MAC,), OLD_UUID)
    # The seed's keys are kept even when the import's parameters no longer have them.
    assert "ssh_authorized_keys" not in new_inp.params


def test_plan_nocloud_nothing_to_do_for_the_same_instance(tmp_path: Path, variant: Variant) -> None:
    inp = inputs(tmp_path, variant)
    old = dict(build_nocloud(inp).files)
    assert plan_nocloud(old, inputs(tmp_path, variant, instance_uuid=NEW_UUID), keep=False).empty


def test_plan_nocloud_new_name_only_keeps_the_instance_id(tmp_path: Path, variant: Variant) -> None:
    old = dict(build_nocloud(inputs(tmp_path, variant)).files)
    update = plan_nocloud(old, inputs(tmp_path, variant, instance_uuid=NEW_UUID, name="vm2.example.org"), keep=False)
    assert set(update.write) == {"meta-data"} and not update.id_changed
    assert yaml.safe_load(update.write["meta-data"])["instance-id"] == OLD_UUID


def test_plan_nocloud_keep_and_network_none(tmp_path: Path, variant: Variant) -> None:
    old = dict(build_nocloud(inputs(tmp_path, variant)).files)
    kept = plan_nocloud(old, inputs(tmp_path, variant, macs=[NEW_MAC], instance_uuid=NEW_UUID), keep=True)
    assert set(kept.write) == {"network-config"} and kept.network_changed and not kept.id_changed
    none = plan_nocloud(old, inputs(tmp_path, variant, instance_uuid=NEW_UUID, params={"network": "none"}),
                        keep=False)
    assert none.remove == ("network-config",) and none.new_id == NEW_UUID


def test_plan_nocloud_refuses_unreadable_meta_data(tmp_path: Path, variant: Variant) -> None:
    with pytest.raises(SeedError, match="meta-data cannot be read"):
        plan_nocloud({"meta-data": b"{oops", "network-config": b"version: 2\n"}, inputs(tmp_path, variant),
                     keep=False)


@pytest.mark.parametrize("agent", ["cloud-init", "flamingo"])
def test_plan_configdrive_updates_both_trees(tmp_path: Path, agent: str) -> None:
    variant = dh.make_variant(tmp_path / "etc", agent=agent)
    old = dict(build_configdrive(inputs(tmp_path, variant, params={"ssh_authorized_keys": dh.KEY})).files)
    new_inp = inputs(tmp_path, variant, macs=[NEW_MAC], instance_uuid=NEW_UUID, name="vm2.example.org")
    update = plan_configdrive(old, new_inp, keep=False)
    trees = ("openstack/latest", "openstack/2012-08-10")
    assert set(update.write) == {f"{t}/{n}" for t in trees for n in ("meta_data.json", "network_data.json")}
    for t in trees:
        md = json.loads(update.write[f"{t}/meta_data.json"])
        assert md["uuid"] == (NEW_UUID if agent == "cloud-init" else OLD_UUID)
        assert (md["name"], md["hostname"]) == ("vm2.example.org", "vm2.example.org")
        assert md["meta"] == {"ganeti_instance_name": "vm2.example.org", "ganeti_instance_uuid": NEW_UUID}
        assert md["public_keys"] == json.loads(old[f"{t}/meta_data.json"])["public_keys"]
        assert macs_in(update.write[f"{t}/network_data.json"]) == (NEW_MAC,)
