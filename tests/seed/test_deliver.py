"""seed: choosing the delivery and writing it, read back by Debian's real cloud-init."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from instance_cloudimage.disk.partitions import GuestLayout, Partition, PartitionTable
from instance_cloudimage.runtime.errors import ParameterError, SeedError, UnsafeImage
from instance_cloudimage.seed import deliver as seed
from instance_cloudimage.seed.drive import needed_size, seed_fs_size
from tests.support import delivery_helpers as dh
from tests.support import guest_images as gi

ROOT = Partition(1, 0, 100, "", "ext4")


def disks(tmp_path: Path, n: int) -> list[Path]:
    return [gi.blank(tmp_path / f"disk{i}.img", 4) for i in range(n)]


# --- choosing the delivery (unit: blkid and the table reader are seams) ---------------------------

@pytest.fixture()
def seams(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    state: dict[str, object] = {"layout": True, "label": None, "content": None}

    def layout(path: str, arch: str) -> GuestLayout:
        if not state["layout"]:
            raise SeedError("no ext4, xfs or btrfs filesystem on the disk (found: nothing)")
        return GuestLayout(ROOT, None, PartitionTable("gpt", 512, 100, (ROOT,)))

    monkeypatch.setattr(seed, "find_guest_layout", layout)
    monkeypatch.setattr(seed, "seed_label_of", lambda p: state["label"])
    monkeypatch.setattr(seed, "describe_disk_content", lambda p: state["content"])
    return state


def plan(tmp_path: Path, ndisks: int = 1, agent: str = "cloud-init", vseed: str = "auto",
         reinstall: bool = False, may_mount: bool = True, **params: str) -> seed.SeedPlan:
    genv = dh.ganeti_env(disks(tmp_path, ndisks), params=params, reinstall=reinstall)
    variant = dh.make_variant(tmp_path / "etc", agent=agent, seed=vseed)
    inst = genv.require_instance()
    return seed.plan_delivery(inst, variant, genv.params, inst.disks[0].path or "", "x86_64", may_mount=may_mount)


@pytest.fixture()
def no_probe(monkeypatch: pytest.MonkeyPatch, seams: dict[str, object]) -> dict[str, object]:
    """An untrusted image's plan must not even read the guest's table and filesystems."""
    def refuse(path: str, arch: str) -> GuestLayout:
        raise AssertionError("the guest layout was probed for an untrusted image")

    monkeypatch.setattr(seed, "find_guest_layout", refuse)
    return seams


def test_untrusted_auto_uses_a_seed_partition_without_disk_1(tmp_path: Path, no_probe: dict[str, object]) -> None:
    assert plan(tmp_path, 1, may_mount=False).delivery == "nocloud-partition"


def test_untrusted_auto_prefers_a_free_disk_1(tmp_path: Path, no_probe: dict[str, object]) -> None:
    p = plan(tmp_path, 2, may_mount=False)
    assert (p.delivery, p.seed_disk and p.seed_disk.index) == ("nocloud-disk", 1)


def test_untrusted_auto_leaves_data_on_disk_1_alone(tmp_path: Path, no_probe: dict[str, object]) -> None:
    no_probe["content"] = "a ext4 filesystem"
    assert plan(tmp_path, 2, may_mount=False).delivery == "nocloud-partition"


def test_untrusted_refuses_what_writes_into_the_guest(tmp_path: Path, no_probe: dict[str, object]) -> None:
    with pytest.raises(SeedError, match="seed=nocloud-fs writes into the image's filesystem") as e:
        plan(tmp_path, 1, may_mount=False, seed="nocloud-fs")
    assert "MountUntrusted" in str(e.value)
    with pytest.raises(SeedError, match="a flamingo variant is configured inside the image's filesystem"):
        plan(tmp_path, 2, agent="flamingo", may_mount=False)
    assert plan(tmp_path, 1, may_mount=False, seed="configdrive-partition").delivery == "configdrive-partition"
    assert plan(tmp_path, 1, may_mount=False, seed="none").delivery == "none"
    # A variant's Seed = nocloud-fs is its default for trusted images, not a request: auto.
    assert plan(tmp_path, 1, may_mount=False, vseed="nocloud-fs").delivery == "nocloud-partition"


def test_auto_cloud_init_seeds_the_guest_fs(tmp_path: Path, seams: dict[str, object]) -> None:
    assert plan(tmp_path, 2).delivery == "nocloud-fs"


def test_auto_falls_back_to_a_blank_second_disk(tmp_path: Path, seams: dict[str, object]) -> None:
    seams["layout"] = False
    p = plan(tmp_path, 2)
    assert (p.delivery, p.seed_disk and p.seed_disk.index) == ("nocloud-disk", 1)


def test_no_filesystem_and_no_second_disk_is_a_clear_error(tmp_path: Path, seams: dict[str, object]) -> None:
    seams["layout"] = False
    with pytest.raises(SeedError, match="cannot seed cloud-init: no ext4") as e:
        plan(tmp_path, 1)
    assert "second disk" in str(e.value)


def test_auto_never_overwrites_data_on_disk_1(tmp_path: Path, seams: dict[str, object]) -> None:
    seams["layout"], seams["content"] = False, "a ext4 filesystem"
    with pytest.raises(SeedError, match="no ext4.*disk 1 holds a ext4 filesystem"):
        plan(tmp_path, 2)


def test_reinstall_reuses_an_earlier_seed_disk(tmp_path: Path, seams: dict[str, object]) -> None:
    seams["content"], seams["label"] = "a vfat filesystem labelled cidata", "cidata"
    assert plan(tmp_path, 2, reinstall=True, seed="nocloud-disk").delivery == "nocloud-disk"


def test_reinstall_refuses_to_overwrite_user_data(tmp_path: Path, seams: dict[str, object]) -> None:
    seams["content"] = "a xfs filesystem"
    with pytest.raises(SeedError, match="disk 1 holds a xfs filesystem; refusing.*on reinstall"):
        plan(tmp_path, 2, reinstall=True, seed="nocloud-disk")


def test_first_install_overwrites_when_asked(tmp_path: Path, seams: dict[str, object],
                                             caplog: pytest.LogCaptureFixture) -> None:
    seams["content"] = "a xfs filesystem"
    with caplog.at_level(logging.WARNING):
        assert plan(tmp_path, 2, seed="configdrive-disk").delivery == "configdrive-disk"
    assert "overwritten" in caplog.text


def test_disk_seed_without_second_disk(tmp_path: Path, seams: dict[str, object]) -> None:
    with pytest.raises(SeedError, match="seed=nocloud-disk needs a second disk"):
        plan(tmp_path, 1, seed="nocloud-disk")


def test_parameter_beats_variant(tmp_path: Path, seams: dict[str, object]) -> None:
    assert plan(tmp_path, 1, vseed="none", seed="nocloud-fs").delivery == "nocloud-fs"
    assert plan(tmp_path, 1, vseed="nocloud-fs").delivery == "nocloud-fs"
    assert plan(tmp_path, 1, vseed="none").delivery == "none"
    assert plan(tmp_path, 1, agent="none").delivery == "none"
    with pytest.raises(ParameterError, match="seed must be one of"):
        plan(tmp_path, 1, seed="floppy")


def test_flamingo_gets_a_config_drive_and_host_side_settings(tmp_path: Path, seams: dict[str, object]) -> None:
    p = plan(tmp_path, 2, agent="flamingo")
    assert (p.delivery, p.flamingo) == ("configdrive-disk", True)
    p1 = plan(tmp_path, 1, agent="flamingo")
    assert (p1.delivery, p1.flamingo) == ("none", True)


def test_seed_disk_size_rules() -> None:
    files = {"meta-data": b"x" * 10, "user-data": b"y" * 100_000}
    need = needed_size(files)
    assert need == (1 + 25) * 4096 + 512 * 1024
    assert seed_fs_size(files, 10 * 1024**3, 1) == 64 * 1024 * 1024
    assert seed_fs_size(files, 2 * 1024 * 1024, 1) == 2 * 1024 * 1024
    with pytest.raises(SeedError, match=r"disk 1 is 256.0 KiB \(262144 bytes\), too small for the seed"):
        seed_fs_size(files, 256 * 1024, 1)
    with pytest.raises(SeedError, match="not a plain relative path"):
        needed_size({"../etc/passwd": b""})


# --- delivery onto real images, read back by cloud-init (integration) ------------------------------

def deliver(tmp_path: Path, images: list[Path], agent: str = "cloud-init", **params: str):  # type: ignore[no-untyped-def]
    genv = dh.ganeti_env(images, params={"ssh_authorized_keys": dh.KEY, **params})
    variant = dh.make_variant(tmp_path / "etc", agent=agent)
    with ExitStack() as stack:
        result = dh.deliver(genv, variant, stack)
    return genv, variant, result


def check_nocloud(result: dict, genv, variant) -> None:  # type: ignore[no-untyped-def]
    expected = dh.expected_files(genv, variant, "nocloud")
    meta = yaml.safe_load(expected["meta-data"])
    assert result["claimed"] is True
    assert result["instance_id"] == meta["instance-id"] != "nocloud"
    assert result["fqdn"] == "vm1.example.org"
    assert result["userdata_raw"] == expected["user-data"].decode()
    assert dh.KEY in result["public_keys"]


@pytest.mark.integration
@pytest.mark.parametrize("builder", [
    gi.gpt_root_first, gi.rocky_like, gi.mbr_logical_root, gi.separate_var,
    lambda p: gi.gpt_root_first(p, "xfs"), lambda p: gi.gpt_root_first(p, "btrfs"),
    lambda p: gi.mbr_primary_root(p, "xfs"),
    lambda p: gi.build_disk(p, 48, "none", [], [gi.Fs(None, "ext4", "cloudimg-rootfs")]),
], ids=["gpt-root-1", "rocky-root-3", "mbr-logical", "separate-var", "xfs", "btrfs", "mbr-xfs", "unpartitioned"])
def test_nocloud_fs_read_back_by_cloud_init(tmp_path: Path, builder) -> None:  # type: ignore[no-untyped-def]
    img = builder(tmp_path / "disk0.img")
    genv, variant, plan_ = deliver(tmp_path, [img])
    assert plan_.delivery == "nocloud-fs"
    result = dh.read_nocloud_in_guest(img)
    check_nocloud(result, genv, variant)
    assert result["dir_mode"] == 0o700
    assert all(mode == (0o600, 0) for mode in result["file_modes"].values())
    assert gi.no_loops(img) and gi.our_mounts(img) == []


@pytest.mark.integration
def test_separate_var_gets_the_seed_not_the_root(tmp_path: Path) -> None:
    img = gi.separate_var(tmp_path / "disk0.img")
    deliver(tmp_path, [img])
    offsets = gi.partition_offsets(img)
    with gi.loop(img, *offsets[2]) as dev, gi.mounted(dev) as var:
        assert (var / "lib/cloud/seed/nocloud/meta-data").is_file()
    with gi.loop(img, *offsets[1]) as dev, gi.mounted(dev) as root:
        assert not (root / "var/lib").exists()


@pytest.mark.integration
def test_nocloud_disk_leaves_the_guest_untouched(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    seed_disk = gi.blank(tmp_path / "disk1.img", 64)
    genv, variant, p = deliver(tmp_path, [img, seed_disk], seed="nocloud-disk")
    assert p.delivery == "nocloud-disk"
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    assert 'LABEL="cidata"' in gi.sh("blkid", "-p", os.fspath(seed_disk))
    check_nocloud(dh.read_fat_seed(seed_disk, "nocloud"), genv, variant)


@pytest.mark.integration
def test_no_linux_fs_falls_back_to_second_disk(tmp_path: Path) -> None:
    img = gi.no_linux_fs(tmp_path / "disk0.img")
    seed_disk = gi.blank(tmp_path / "disk1.img", 8)
    genv, variant, p = deliver(tmp_path, [img, seed_disk])
    assert p.delivery == "nocloud-disk"
    check_nocloud(dh.read_fat_seed(seed_disk, "nocloud"), genv, variant)


@pytest.mark.integration
def test_no_linux_fs_and_one_disk_is_a_clear_error(tmp_path: Path) -> None:
    img = gi.no_linux_fs(tmp_path / "disk0.img")
    with pytest.raises(SeedError, match=r"cannot seed cloud-init: no ext4, xfs or btrfs filesystem.*vfat"):
        deliver(tmp_path, [img])
    assert gi.no_loops(img)


@pytest.mark.integration
def test_seed_disk_too_small(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    tiny = tmp_path / "disk1.img"
    tiny.write_bytes(b"\0" * 300 * 1024)
    with pytest.raises(SeedError, match=r"disk 1 is 300.0 KiB \(307200 bytes\), too small"):
        deliver(tmp_path, [img, tiny], seed="nocloud-disk")


@pytest.mark.integration
def test_configdrive_disk_has_both_trees(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    drive = gi.blank(tmp_path / "disk1.img", 16)
    genv, variant, _ = deliver(tmp_path, [img, drive], seed="configdrive-disk")
    assert 'LABEL="config-2"' in gi.sh("blkid", "-p", os.fspath(drive))
    listing = gi.sh("mdir", "-/", "-b", "-i", os.fspath(drive), "::/", env={"MTOOLS_SKIP_CHECK": "1"})
    for version in ("latest", "2012-08-10"):
        assert f"::/openstack/{version}/meta_data.json" in listing
    expected = json.loads(dh.expected_files(genv, variant, "configdrive")["openstack/latest/meta_data.json"])
    result = dh.read_fat_seed(drive, "configdrive")
    assert result["instance_id"] == expected["uuid"]
    assert result["fqdn"] == "vm1.example.org"
    assert dh.KEY in result["public_keys"]


@pytest.mark.integration
@pytest.mark.parametrize("link", ["/tmp/HOST", "../../../tmp/HOST"])
def test_hostile_cloud_dir_symlink_never_reaches_the_host(tmp_path: Path, link: str) -> None:
    host = tmp_path / "host"
    host.mkdir()
    img = gi.hostile(tmp_path / "disk0.img", {"var/lib/cloud": link.replace("/tmp/HOST", os.fspath(host))})
    with pytest.raises(UnsafeImage, match="/var/lib/cloud is a symbolic link"):
        deliver(tmp_path, [img])
    assert list(host.iterdir()) == []
    assert gi.no_loops(img) and gi.our_mounts(img) == []


@pytest.mark.integration
def test_flamingo_boots_with_hostname_and_root_keys(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    drive = gi.blank(tmp_path / "disk1.img", 16)
    _, _, p = deliver(tmp_path, [img, drive], agent="flamingo")
    assert (p.delivery, p.flamingo) == ("configdrive-disk", True)
    with gi.loop(img, *gi.partition_offsets(img)[1]) as dev, gi.mounted(dev) as root:
        assert (root / "etc/hostname").read_text() == "vm1.example.org\n"
        keys = root / "root/.ssh/authorized_keys"
        assert dh.KEY in keys.read_text().splitlines()
        assert keys.stat().st_mode & 0o777 == 0o600 and (root / "root/.ssh").stat().st_mode & 0o777 == 0o700
        # The drive is not mounted: a flamingo that found it would apply its user-data a second time.
        assert (root / "etc/fstab").read_text() == "LABEL=cloudimg-rootfs / ext4 defaults 0 1\n"
        assert not (root / "mnt").exists()
        assert not (root / "var/lib/cloud/seed").exists()
    assert 'LABEL="config-2"' in gi.sh("blkid", "-p", os.fspath(drive))


@pytest.mark.integration
def test_flamingo_ssh_dir_symlink_is_refused(tmp_path: Path) -> None:
    host = tmp_path / "host-ssh"
    host.mkdir()
    img = gi.hostile(tmp_path / "disk0.img", {"root/.ssh": os.fspath(host)})
    genv = dh.ganeti_env([img], params={"ssh_authorized_keys": dh.KEY})
    variant = dh.make_variant(tmp_path / "etc", agent="flamingo")
    with pytest.raises(UnsafeImage, match="/root/.ssh is a symbolic link"), ExitStack() as stack:
        dh.deliver(genv, variant, stack)
    assert list(host.iterdir()) == []
    assert gi.no_loops(img)


@pytest.mark.integration
def test_reinstall_writes_a_fresh_seed(tmp_path: Path) -> None:
    img = gi.gpt_root_first(tmp_path / "disk0.img")
    drive = gi.blank(tmp_path / "disk1.img", 16)
    variant = dh.make_variant(tmp_path / "etc")
    ids = []
    for reinstall in (False, True, True):
        genv = dh.ganeti_env([img, drive], params={"seed": "nocloud-disk"}, reinstall=reinstall)
        with ExitStack() as stack:
            dh.deliver(genv, variant, stack)
        ids.append(dh.read_fat_seed(drive, "nocloud")["instance_id"])
    assert ids[0] == genv.require_instance().uuid
    assert len(set(ids)) == 3  # cloud-init runs its per-instance modules again after each reinstall


@pytest.mark.integration
def test_explicit_nocloud_fs_without_filesystem(tmp_path: Path) -> None:
    img = gi.no_linux_fs(tmp_path / "disk0.img")
    with pytest.raises(SeedError, match="cannot seed the guest filesystem: no ext4") as e:
        deliver(tmp_path, [img], seed="nocloud-fs")
    assert "seed=nocloud-disk" in str(e.value)


@pytest.mark.integration
@pytest.mark.parametrize(("node", "kind", "shown"), [
    ("etc/passwd", "chr", "/etc/passwd"), ("etc/passwd", "fifo", "/etc/passwd"),
    ("etc/shadow", "chr", "/etc/shadow"), ("root/.ssh/authorized_keys", "chr", "/root/.ssh/authorized_keys"),
])
def test_flamingo_device_or_fifo_in_the_guest_is_refused(tmp_path: Path, node: str, kind: str, shown: str) -> None:
    # On the nodev mount a device node cannot even be opened (EACCES): that is the image's doing,
    # an UnsafeImage, never an OSError traceback.
    img = gi.hostile(tmp_path / "disk0.img", {}, nodes={node: kind})
    drive = gi.blank(tmp_path / "disk1.img", 16)
    genv = dh.ganeti_env([img, drive], params={"ssh_authorized_keys": dh.KEY})
    variant = dh.make_variant(tmp_path / "etc", agent="flamingo")
    with pytest.raises(UnsafeImage, match=f"the image's {shown} is not a regular file"), ExitStack() as stack:
        dh.deliver(genv, variant, stack)
    assert gi.no_loops(img) and gi.our_mounts(img) == []


NOCLOUD_COMPONENTS = ["var", "var/lib", "var/lib/cloud", "var/lib/cloud/seed", "var/lib/cloud/seed/nocloud"]


@pytest.mark.integration
@pytest.mark.parametrize("where", NOCLOUD_COMPONENTS)
@pytest.mark.parametrize("absolute", [True, False], ids=["absolute", "relative"])
def test_a_symlink_at_any_seed_path_component_never_reaches_the_host(tmp_path: Path, where: str,
                                                                      absolute: bool) -> None:
    host = tmp_path / "host"
    host.mkdir()
    # Relative: enough '..' to climb out of the mount point to the host's root, wherever it is.
    target = os.fspath(host) if absolute else "../" * 24 + os.fspath(host).lstrip("/")
    img = gi.hostile(tmp_path / "disk0.img", {where: target})
    with pytest.raises(UnsafeImage, match=f"the image's /{where} is a symbolic link"):
        deliver(tmp_path, [img])
    assert list(host.iterdir()) == []
    assert gi.no_loops(img) and gi.our_mounts(img) == []


@pytest.mark.integration
def test_planted_seed_files_are_replaced_never_written_through(tmp_path: Path) -> None:
    host = tmp_path / "host-file"
    host.write_text("host\n")
    seed_dir = "var/lib/cloud/seed/nocloud"
    img = gi.build_disk(tmp_path / "disk0.img", 64, "gpt", [gi.Part(None, gi.ROOT_X86_64, "root")], [gi.Fs(
        1, "ext4", "cloudimg-rootfs", files={**gi.BASE_FILES, "etc/shadow": "root:guest-shadow:::\n",
                                             f"{seed_dir}/.keep": ""},
        symlinks={f"{seed_dir}/meta-data": os.fspath(host)},
        nodes={f"{seed_dir}/user-data": "link:etc/shadow", f"{seed_dir}/network-config": "fifo",
               f"{seed_dir}/vendor-data": "chr"})])
    deliver(tmp_path, [img])
    assert host.read_text() == "host\n"
    with gi.loop(img, *gi.partition_offsets(img)[1]) as dev, gi.mounted(dev) as root:
        assert (root / "etc/shadow").read_text() == "root:guest-shadow:::\n"
        entries = {p.name: os.lstat(p) for p in (root / seed_dir).iterdir() if p.name != ".keep"}
        assert sorted(entries) == ["meta-data", "network-config", "user-data"]  # no vendor-data: removed
        for name, st in entries.items():
            assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == 0, name
            assert stat.S_IMODE(st.st_mode) == 0o600, name
    assert gi.no_loops(img) and gi.our_mounts(img) == []


@pytest.mark.integration
@pytest.mark.parametrize(("link", "refused"), [
    ("etc/hostname", None),  # replaced by a regular file, never written through
    ("etc/fstab", None),  # never read or written
    ("etc/passwd", "the image's /etc/passwd is a symbolic link"),
    ("etc", "the image's /etc is a symbolic link"),
    ("root", "the image's /root is a symbolic link"),
    ("root/.ssh/authorized_keys", "the image's /root/.ssh/authorized_keys is a symbolic link"),
    ("mnt", None),
])
def test_flamingo_symlinks_never_reach_the_host(tmp_path: Path, link: str, refused: str | None) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "file").write_text("host\n")
    target = os.fspath(host if link in ("etc", "root", "mnt") else host / "file")
    files = {k: v for k, v in gi.BASE_FILES.items() if k != link and not k.startswith(link + "/")}
    img = gi.build_disk(tmp_path / "disk0.img", 64, "gpt", [gi.Part(None, gi.ROOT_X86_64, "root")],
                        [gi.Fs(1, "ext4", "cloudimg-rootfs", files=files, symlinks={link: target})])
    drive = gi.blank(tmp_path / "disk1.img", 16)
    genv = dh.ganeti_env([img, drive], params={"ssh_authorized_keys": dh.KEY})
    variant = dh.make_variant(tmp_path / "etc", agent="flamingo")
    with ExitStack() as stack:
        if refused:
            with pytest.raises(UnsafeImage, match=refused):
                dh.deliver(genv, variant, stack)
        else:
            dh.deliver(genv, variant, stack)
    assert sorted(p.name for p in host.iterdir()) == ["file"]
    assert (host / "file").read_text() == "host\n"
    assert gi.no_loops(img) and gi.our_mounts(img) == []


def test_seed_files_are_staged_privately(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """They hold the password hash and user-data until mcopy has copied them onto the seed disk."""
    from instance_cloudimage.seed import drive as seeddisk

    seen: dict[str, int] = {}

    def fake_run(argv: list[str], **kwargs: object) -> None:
        for arg in argv:
            if arg.startswith("/") and arg != os.fspath(tmp_path / "disk"):
                seen[arg] = stat.S_IMODE(os.stat(arg).st_mode)
                for sub in Path(arg).rglob("*"):
                    seen[os.fspath(sub)] = stat.S_IMODE(sub.stat().st_mode)

    monkeypatch.setattr(seeddisk, "run", fake_run)
    seeddisk.copy_into_fat(os.fspath(tmp_path / "disk"), {"user-data": b"#cloud-config\n",
                                                          "openstack/latest/meta_data.json": b"{}"})
    files = {p: m for p, m in seen.items() if os.path.basename(p) in ("user-data", "meta_data.json")}
    assert len(files) == 2 and set(files.values()) == {0o600}, seen
    assert all(m == 0o700 for p, m in seen.items() if p not in files), seen


@pytest.mark.integration
@pytest.mark.parametrize("own_seed", [True, False], ids=["own-cidata", "none"])
def test_an_images_own_seed_partition_is_warned_of(tmp_path: Path, own_seed: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """cloud-init reads the first cidata filesystem it finds: the image's own would compete with ours."""
    extra = ([gi.Part(8, gi.LINUX, "seed")], [gi.Fs(2, "vfat", "CIDATA", files={})]) if own_seed else ([], [])
    img = gi.build_disk(tmp_path / "disk0.img", 96, "gpt", [gi.Part(64, gi.ROOT_X86_64, "root"), *extra[0]],
                        [gi.Fs(1, "ext4", "cloudimg-rootfs"), *extra[1]])
    seed_disk = gi.blank(tmp_path / "disk1.img", 64)
    with caplog.at_level(logging.WARNING):
        _, _, p = deliver(tmp_path, [img, seed_disk], seed="nocloud-disk")
    assert p.delivery == "nocloud-disk"
    warned = "the image has its own seed partition (partition 2, labelled CIDATA)" in caplog.text
    assert warned == own_seed, caplog.text
