"""seedrename: rename puts the new name into existing seeds, keeps the instance-id, never fails."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from contextlib import ExitStack
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
import yaml

from instance_cloudimage.ganeti.env import Script, parse_environment
from instance_cloudimage.ganeti.simulate import SimulatedDisk
from instance_cloudimage.runtime.siteconfig import SiteConfig
from instance_cloudimage.seed.rename import (
    make_renamer,
    rename_cloud_config,
    rename_metadata_json,
    rename_metadata_yaml,
    rename_user_data,
)
from instance_cloudimage.verbs.rename import run_rename
from tests.support import delivery_helpers as dh
from tests.support import guest_images as gi

R = make_renamer("old.example.org", "new.example.org")


def test_renamer_maps_fqdn_and_short_name_only() -> None:
    assert (R("old.example.org"), R("old"), R("other"), R("old.example")) == ("new.example.org", "new", None, None)


def test_meta_data_keeps_instance_id() -> None:
    out = rename_metadata_yaml(b"instance-id: iid-1\nlocal-hostname: old.example.org\n", R)
    assert out is not None and yaml.safe_load(out) == {"instance-id": "iid-1", "local-hostname": "new.example.org"}
    assert rename_metadata_yaml(b"instance-id: iid-1\nlocal-hostname: custom\n", R) is None
    assert rename_metadata_yaml(b"{bad yaml", R) is None


def test_meta_data_json() -> None:
    out = rename_metadata_json(json.dumps({"uuid": "u", "hostname": "old.example.org", "name": "old"}).encode(), R)
    assert out is not None and json.loads(out) == {"uuid": "u", "hostname": "new.example.org", "name": "new"}


def test_cloud_config_lines_change_and_nothing_else() -> None:
    text = (b"#cloud-config\n# hostname: old kept in a comment\nhostname: old\nfqdn: 'old.example.org'  # ours\n"
            b"write_files:\n  - path: /etc/x\n    content: |\n      hostname: old\n")
    out = rename_cloud_config(text, R)
    assert out == text.replace(b"\nhostname: old\n", b"\nhostname: new\n").replace(
        b"fqdn: 'old.example.org'", b"fqdn: 'new.example.org'")
    assert b"      hostname: old\n" in out  # nested, the user's own content: untouched


def test_mime_parts_are_renamed_with_their_encoding() -> None:
    msg = MIMEMultipart()
    cfg = MIMEText("#cloud-config\nhostname: old\nfqdn: old.example.org\n", "cloud-config")
    msg.attach(cfg)
    msg.attach(MIMEText("#!/bin/sh\necho hostname: old\n", "x-shellscript"))
    assert cfg["Content-Transfer-Encoding"] == "7bit"
    b64 = MIMEText("#cloud-config\nhostname: old\n", "cloud-config", "utf-8")
    assert b64["Content-Transfer-Encoding"] == "base64"
    msg.attach(b64)
    out = rename_user_data(msg.as_bytes(), R)
    assert out is not None
    import email

    parts = [p for p in email.message_from_bytes(out).walk() if not p.is_multipart()]
    texts = [p.get_payload(decode=True) for p in parts]
    assert texts[0] == b"#cloud-config\nhostname: new\nfqdn: new.example.org\n"
    assert texts[1] == b"#!/bin/sh\necho hostname: old\n"
    assert texts[2] == b"#cloud-config\nhostname: new\n"
    assert parts[2]["Content-Transfer-Encoding"] == "base64"
    assert base64.b64decode(parts[2].get_payload()) == texts[2]


def test_scripts_and_other_user_data_are_left_alone() -> None:
    assert rename_user_data(b"#!/bin/sh\nhostname: old\n", R) is None
    assert rename_user_data(b"#include\nhttps://example.org/old\n", R) is None


# --- rename on real seeds (integration) ------------------------------------------------------------

def create(tmp_path: Path, images: list[Path], **params: str) -> None:
    genv = dh.ganeti_env(images, name="old.example.org", params=params)
    variant = dh.make_variant(tmp_path / "etc")
    with ExitStack() as stack:
        dh.deliver(genv, variant, stack)


def rename(images: list[Path], **params: str) -> None:
    run_rename(dh.ganeti_env(images, Script.RENAME, name="new.example.org", old_name="old.example.org",
                             params=params), SiteConfig())


@pytest.mark.integration
def test_rename_updates_the_nocloud_dir_keeping_the_instance_id(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    create(tmp_path, [img])
    before = dh.read_nocloud_in_guest(img)
    rename([img])
    after = dh.read_nocloud_in_guest(img)
    assert before["fqdn"] == "old.example.org" and after["fqdn"] == "new.example.org"
    assert after["instance_id"] == before["instance_id"]
    assert "old" not in after["userdata_raw"]  # wherever the builder put the name, the old one is gone
    assert after["file_modes"]["meta-data"] == (0o600, 0)
    assert gi.no_loops(img) and gi.our_mounts(img) == []


@pytest.mark.integration
@pytest.mark.parametrize(("seed_kind", "reader"), [("nocloud-disk", "nocloud"), ("configdrive-disk", "configdrive")])
def test_rename_updates_a_seed_disk(tmp_path: Path, seed_kind: str, reader: str) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    drive = gi.blank(tmp_path / "disk1.img", 16)
    create(tmp_path, [img, drive], seed=seed_kind)
    before = dh.read_fat_seed(drive, reader)
    rename([img, drive])
    after = dh.read_fat_seed(drive, reader)
    assert (before["fqdn"], after["fqdn"]) == ("old.example.org", "new.example.org")
    assert after["instance_id"] == before["instance_id"]
    if reader == "configdrive":
        legacy = gi.sh("mcopy", "-n", "-i", os.fspath(drive), "::/openstack/2012-08-10/meta_data.json", "-",
                       env={"MTOOLS_SKIP_CHECK": "1"})
        assert json.loads(legacy)["hostname"] == "new.example.org"


@pytest.mark.integration
def test_rename_updates_etc_hostname_holding_the_old_name(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    offsets = gi.partition_offsets(img)[1]
    with gi.loop(img, *offsets) as dev, gi.mounted(dev) as root:
        (root / "etc/hostname").write_text("old.example.org\n")
    rename([img])
    with gi.loop(img, *offsets) as dev, gi.mounted(dev) as root:
        assert (root / "etc/hostname").read_text() == "new.example.org\n"


@pytest.mark.integration
def test_rename_with_nothing_to_change_leaves_the_disk_byte_for_byte(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """No seed, /etc/hostname not the old name: the guest is only looked at, read-only.

    Mounting read-write alone rewrites an ext4 superblock; Ganeti runs rename right after an
    import, whose disk must stay identical to the export.
    """
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    create(tmp_path, [img], seed="none")
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        rename([img])
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    assert "disk 0: nothing on it carries the old name; left untouched" in caplog.text
    assert gi.no_loops(img) and gi.our_mounts() == []


def sha256s(images: list[Path]) -> list[str]:
    return [hashlib.sha256(img.read_bytes()).hexdigest() for img in images]


@pytest.mark.integration
@pytest.mark.parametrize("seed", ["nocloud-fs", "nocloud-disk", "configdrive-disk", "nocloud-partition"])
def test_rename_to_the_same_name_leaves_every_disk_byte_for_byte(tmp_path: Path, seed: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Ganeti runs rename after every import, usually with OLD_INSTANCE_NAME == INSTANCE_NAME: the
    seed (and its instance-id) must stay exactly as the import wrote it, and the log say so once."""
    img = gi.gpt_root_first(tmp_path / "disk0.img", root_mib=120)
    images = [img] + ([gi.blank(tmp_path / "disk1.img", 16)] if seed.endswith("-disk") else [])
    create(tmp_path, images, seed=seed)
    if seed == "nocloud-fs":
        assert dh.read_nocloud_in_guest(img)["fqdn"] == "old.example.org"
    elif seed == "nocloud-partition":
        assert dh.read_seed_partition(img, "nocloud")["fqdn"] == "old.example.org"
    else:
        assert dh.read_fat_seed(images[1], seed.split("-")[0])["fqdn"] == "old.example.org"
    before = sha256s(images)
    env = dh.ganeti_env(images, Script.RENAME, name="old.example.org", old_name="old.example.org")
    caplog.clear()  # only the rename's lines
    with caplog.at_level(logging.DEBUG, logger="instance_cloudimage"):
        run_rename(env, SiteConfig())
    assert sha256s(images) == before
    assert [r.getMessage() for r in caplog.records] == [
        "the name old.example.org did not change; no disk was looked at or written"]
    assert gi.no_loops(img) and gi.our_mounts() == []


@pytest.mark.integration
def test_rename_keeps_an_explicit_hostname(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    create(tmp_path, [img], hostname="fixed.example.org")
    rename([img], hostname="fixed.example.org")
    assert dh.read_nocloud_in_guest(img)["fqdn"] == "fixed.example.org"


@pytest.mark.integration
def test_rename_never_fails_the_job(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img = gi.no_linux_fs(tmp_path / "disk0.img")
    with caplog.at_level(logging.WARNING):
        rename([img])  # no exception
    assert "disk 0: the seed keeps the old name (no ext4, xfs or btrfs" in caplog.text
    assert gi.no_loops(img)


def test_rename_names_a_uri_only_disk_it_leaves_alone(caplog: pytest.LogCaptureFixture) -> None:
    """A disk with only DISK_0_URI (access=userspace) is not staged for a rename: the log says so."""
    env = dh.environ([SimulatedDisk(uri="nbd+unix:///disk?socket=/run/x.sock")], name="new.example.org",
                     old_name="old.example.org")
    with caplog.at_level(logging.INFO, logger="instance_cloudimage"):
        run_rename(parse_environment(env, Script.RENAME), SiteConfig())
    assert "disk 0 is reachable only through a URI; its seed keeps the old name old.example.org" in caplog.text
    assert "warning" not in caplog.text.lower()
