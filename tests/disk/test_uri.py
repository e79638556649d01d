"""Disks reachable only through a URI (access=userspace): create, export and import through the
real installed scripts onto disks served over NBD by a real qemu-nbd on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.ganeti.simulate import SimulatedDisk
from instance_cloudimage.ganeti.uri import check_uri, redact_uri, uri_secrets
from instance_cloudimage.runtime.errors import EnvironmentError_
from instance_cloudimage.runtime.log import HIDDEN, hide_values, redact
from instance_cloudimage.runtime.siteconfig import Paths
from tests.conftest import need_tools
from tests.support import delivery_helpers as dh
from tests.support import guest_images as gi
from tests.verbs import test_transfer as lc

MIB = 1024 * 1024
DRIVER = Path(__file__).resolve().parents[1] / "support" / "create_driver.py"


# --- unit: which URIs are opened, and how they are shown ----------------------------------------

@pytest.mark.parametrize("uri", [
    "rbd:pool/image", "rbd:pool/image:id=admin:key=AQBxyz==", "gluster://192.0.2.1:24007/vol/img",
    "gluster+unix:///vol/img?socket=/run/gluster.sock", "nbd://127.0.0.1:10809/disk",
    "nbd+unix:///disk?socket=/run/nbd.sock", "nbd:unix:/run/nbd.sock:exportname=disk",
    "iscsi://192.0.2.1/iqn.2001-04.com.example:storage/1", "nfs://server/export/disk.img", "ssh://u@host/disk",
])
def test_network_protocols_are_accepted(uri: str) -> None:
    check_uri(uri, "DISK_0_URI")


@pytest.mark.parametrize(("uri", "said"), [
    ("file:/etc/shadow", "'file' protocol"),
    ('json:{"driver":"raw","file":{"driver":"file","filename":"/etc/shadow"}}', "'json' protocol"),
    ("/dev/sda", "a plain path"),
    ("fat:rw:/etc", "'fat' protocol"),
    ("vvfat:/etc", "'vvfat' protocol"),
    ("blkdebug:/tmp/conf:/etc/shadow", "'blkdebug' protocol"),
    ("host_device:/dev/sda", "'host_device' protocol"),
    ("https://example.org/disk.img", "'https' protocol"),
    ("-fdisk:x", "'-fdisk' protocol"),
    ("NBD://127.0.0.1/disk", "'NBD' protocol"),  # qemu matches protocol names exactly
    ("nbd://127.0.0.1/disk\n", "control characters"),
])
def test_other_uris_are_refused(uri: str, said: str) -> None:
    with pytest.raises(EnvironmentError_) as e:
        check_uri(uri, "DISK_0_URI")
    assert said in e.value.message and "$DISK_0_URI" in e.value.message
    assert "/etc" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("uri", "shown", "secrets"), [
    ("rbd:pool/img:id=admin:key=AQBsecret==:mon_host=192.0.2.1\\:6789",
     "rbd:pool/img:id=admin:key=***:mon_host=192.0.2.1\\:6789", ["AQBsecret=="]),
    ("rbd:pool/img", "rbd:pool/img", []),
    ("iscsi://alice%s3cret@192.0.2.1/iqn.x:t/0", "iscsi://alice:***@192.0.2.1/iqn.x:t/0", ["s3cret"]),
    ("ssh://bob:pw@host/disk", "ssh://bob:***@host/disk", ["pw"]),
    ("ssh://bob@host/disk", "ssh://bob@host/disk", []),
    ("nbd+unix:///disk?socket=/run/x.sock", "nbd+unix:///disk?socket=/run/x.sock", []),
    ("gluster://h/v/i?password=hunter2&socket=/s", "gluster://h/v/i?password=***&socket=/s", ["hunter2"]),
])
def test_credentials_are_redacted(uri: str, shown: str, secrets: list[str]) -> None:
    assert redact_uri(uri) == shown
    assert uri_secrets(uri) == secrets
    hide_values(secrets)
    assert all(s not in redact(f"qemu-img: Could not open '{uri}'") for s in secrets)
    if secrets:
        assert HIDDEN in redact(f"qemu-img: Could not open '{uri}'")


# --- integration: real qemu-nbd, real scripts ---------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nbd_served(backing: Path, *, tcp: bool = False) -> Iterator[str]:
    """Serve ``backing`` (a raw file) with qemu-nbd; yields its URI."""
    with tempfile.TemporaryDirectory(prefix="nbd-") as tmp:  # short: a socket path has < 108 bytes
        sock = Path(tmp, "s")
        if tcp:
            port = free_port()
            where = ["-b", "127.0.0.1", "-p", str(port)]
            uri = f"nbd://127.0.0.1:{port}/disk"
        else:
            where = ["-k", os.fspath(sock)]
            uri = f"nbd+unix:///disk?socket={sock}"
        proc = subprocess.Popen(["qemu-nbd", "--persistent", "--shared=4", "-f", "raw", "-x", "disk", *where,
                                 os.fspath(backing)], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while subprocess.run(["qemu-img", "info", "-f", "raw", uri], capture_output=True).returncode:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "qemu-nbd did not come up"
                time.sleep(0.05)
            yield uri
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()


def install_uri_os(base: Path, *, masked_hooks: bool = False) -> Path:
    need_tools("qemu-nbd", "qemu-img")
    etc = base / "etc"
    dh.make_variant(etc, agent="cloud-init")
    (etc / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {base}\n"
                                       f"[Disks]\nStagingDirectory = {base / 'staging'}\n")
    if masked_hooks:  # a site masking the shipped post-write hooks (a mount would stamp the superblock)
        hooks = etc / "hooks.d" / "post-write.d"
        hooks.mkdir(parents=True)
        for name in ("50-install-files", "60-serial-console"):
            (hooks / name).symlink_to("/dev/null")
    install_os(base / "os", Paths(etc, base / "cache"), python=sys.executable)
    return base / "os"


@pytest.fixture(scope="module")
def uri_os(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_uri_os(tmp_path_factory.mktemp("uri-os"))


@pytest.fixture(scope="module")
def exact_os(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Leaves an image with seed=none byte for byte as it is."""
    return install_uri_os(tmp_path_factory.mktemp("exact-os"), masked_hooks=True)


def staging_of(os_dir: Path) -> list[Path]:
    d = os_dir.parent / "staging"
    return sorted(d.iterdir()) if d.exists() else []


def transfer_env(os_dir: Path, uri: str, verb: str, size: int, *, debug: bool = False) -> dict[str, str]:
    """What Ganeti passes for a disk with only a URI: no DISK_0_PATH, no <VERB>_DEVICE."""
    return lc.ganeti_env(os_dir, SimulatedDisk(uri=uri, backend_type="block", size_mib=size // MIB), verb,
                         variant="test", debug=debug)


def run_script(os_dir: Path, verb: str, env: dict[str, str], stdin: bytes = b"",
               stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([os_dir / verb], env=env, cwd=os_dir, input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, check=False)


def error_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode().splitlines() if ": error: " in line]


pytestmark = pytest.mark.integration


def test_export_from_a_uri_and_import_onto_another(uri_os: Path, tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    data = lc.make_disk(source)
    target = tmp_path / "target.img"
    lc.make_target(target, dirty=True)  # every gap must be zeroed through the URI
    with nbd_served(source, tcp=True) as src_uri:
        exported = run_script(uri_os, "export", transfer_env(uri_os, src_uri, "export", len(data)))
    assert exported.returncode == 0, exported.stderr.decode()
    assert exported.stdout[:8] == b"\x89CIDISK\n"
    # Compact: about the data, not the 64 MiB disk (a raw copy would be all of it).
    assert len(exported.stdout) < 10 * MIB
    with nbd_served(target) as dst_uri:
        imported = run_script(uri_os, "import", transfer_env(uri_os, dst_uri, "import", len(data)),
                              stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr.decode()
    assert target.read_bytes() == data
    assert staging_of(uri_os) == []


def test_raw_stream_onto_a_uri_leaves_the_rest_of_the_disk(uri_os: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.img"
    lc.make_target(target, dirty=True)
    raw = os.urandom(MIB) + bytes(2 * MIB) + os.urandom(4096)
    with nbd_served(target) as uri:
        ran = run_script(uri_os, "import", transfer_env(uri_os, uri, "import", lc.DISK_SIZE), stdin=raw)
    assert ran.returncode == 0, ran.stderr.decode()
    got = target.read_bytes()
    assert got[:len(raw)] == raw  # its zeros written through the URI
    assert got[len(raw):] == b"\xa5" * (lc.DISK_SIZE - len(raw))


@pytest.mark.parametrize("cut", [100, 4 * MIB], ids=["in-a-record", "near-the-end"])
def test_truncated_stream_onto_a_uri_fails_and_leaves_it_untouched(uri_os: Path, tmp_path: Path, cut: int) -> None:
    source = tmp_path / "source.img"
    data = lc.make_disk(source)
    with nbd_served(source) as uri:
        exported = run_script(uri_os, "export", transfer_env(uri_os, uri, "export", len(data)))
    assert exported.returncode == 0, exported.stderr.decode()
    target = tmp_path / "target.img"
    lc.make_target(target, dirty=True)
    before = target.read_bytes()
    with nbd_served(target) as uri:
        ran = run_script(uri_os, "import", transfer_env(uri_os, uri, "import", len(data)),
                         stdin=exported.stdout[:-cut])
    assert ran.returncode != 0
    errors = error_lines(ran.stderr)
    assert len(errors) == 1 and "truncated" in errors[0], ran.stderr.decode()
    assert target.read_bytes() == before
    assert staging_of(uri_os) == []


@pytest.mark.parametrize("uri", ["file:/etc/hostname", 'json:{"file.filename":"/etc/hostname"}'])
@pytest.mark.parametrize("verb", ["export", "import", "create"])
def test_host_path_uris_are_refused(uri_os: Path, tmp_path: Path, uri: str, verb: str) -> None:
    if verb == "create":
        env = dh.environ([SimulatedDisk(uri=uri)])
    else:
        env = transfer_env(uri_os, uri, verb, lc.DISK_SIZE)
    ran = run_script(uri_os, verb, env, stdin=b"x" * 4096)
    assert ran.returncode != 0
    errors = error_lines(ran.stderr)
    assert len(errors) == 1, ran.stderr.decode()
    assert "URI has the '" in errors[0] and "which this provider does not open" in errors[0]
    assert "/etc/hostname" not in ran.stderr.decode()


def test_credentials_never_reach_the_log(uri_os: Path) -> None:
    secret = "AQDsecretkeyNOTSHOWN=="
    ran = run_script(uri_os, "export", transfer_env(uri_os, f"rbd:nopool/noimage:id=x:key={secret}", "export",
                                                    lc.DISK_SIZE, debug=True))
    assert ran.returncode != 0  # there is no Ceph cluster here
    text = ran.stderr.decode()
    assert secret not in text and "rbd:nopool/noimage" in text, text


# --- create ---------------------------------------------------------------------------------------

def create_env(disks: list[Path | str], **params: str) -> dict[str, str]:
    """dh.environ, with the disks given as URIs having no DISK_N_PATH."""
    return dh.environ([d if isinstance(d, Path) else SimulatedDisk(uri=d, backend_type="block") for d in disks],
                      params=params)


def start_create(os_dir: Path, env: dict[str, str], pause: str | None = None) -> subprocess.Popen[bytes]:
    if pause:
        env = {**env, "TEST_PAUSE_AFTER": pause}
    return subprocess.Popen([sys.executable, os.fspath(DRIVER), "create", os.fspath(os_dir / "create")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os_dir)


def create(os_dir: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = start_create(os_dir, env)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode()


def demo_image(os_dir: Path) -> Path:
    return os_dir.parent / "cache" / "builtin" / "demo-1.qcow2"


def test_create_onto_a_uri_disk(exact_os: Path, tmp_path: Path) -> None:
    backing = tmp_path / "disk0.img"
    with open(backing, "wb") as f:  # a reused disk: whatever the image does not cover must end up zero
        f.write(b"\xa5" * 256 * MIB)
    with nbd_served(backing) as uri:
        rc, err = create(exact_os, create_env([uri], seed="none"))
    assert rc == 0, err
    assert "writing disk 0" in err
    # Not strict (-s): the 128 MiB image must match, and the rest of the 256 MiB disk read zeros.
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", demo_image(exact_os), backing],
                          capture_output=True, text=True, check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    assert staging_of(exact_os) == []


def test_create_grows_and_seeds_through_uris(uri_os: Path, tmp_path: Path) -> None:
    disk0 = gi.blank(tmp_path / "disk0.img", 320)
    disk1 = tmp_path / "disk1.img"
    disk1.write_bytes(b"\xa5" * 8 * MIB)  # data: nocloud-disk, asked for, overwrites it on a first install
    with nbd_served(disk0) as uri0, nbd_served(disk1) as uri1:
        rc, err = create(uri_os, create_env([uri0, uri1], grow_root="yes", seed="nocloud-disk"))
    assert rc == 0, err
    start, size = gi.partition_offsets(disk0)[1]
    assert 320 * MIB - (start + size) < MIB  # grown to the end of the disk
    seed = dh.read_fat_seed(disk1, "nocloud")
    assert seed["fqdn"] == "vm1.example.org"
    assert disk1.stat().st_size == 8 * MIB
    assert staging_of(uri_os) == []


def test_sigterm_during_a_uri_create_removes_the_staging_file(uri_os: Path, tmp_path: Path) -> None:
    backing = gi.blank(tmp_path / "disk0.img", 256)
    with nbd_served(backing) as uri:
        proc = start_create(uri_os, create_env([uri]), pause="disk.mount.mount_device")
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"READY\n", proc.stderr.read().decode() if proc.stderr else ""
        assert len(staging_of(uri_os)) == 1  # caught while the staging file exists
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert staging_of(uri_os) == []
    assert no_loop_on(uri_os.parent / "staging"), "a loop device still holds the (deleted) staging file"


def no_loop_on(directory: Path, timeout: float = 5.0) -> bool:
    """No loop device is backed by a file in ``directory`` (see gi.no_loops for why it may linger)."""
    deadline = time.monotonic() + timeout
    while os.fspath(directory) + "/" in gi.sh("losetup", "--list", "--noheadings", "--output", "BACK-FILE"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_staging_costs_the_data_not_the_disk_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 GiB URI disk holding ~10 MiB: the staging file of export and import holds ~10 MiB."""
    from instance_cloudimage.ganeti.env import Script, parse_environment
    from instance_cloudimage.runtime.siteconfig import SiteConfig
    from instance_cloudimage.verbs import export, import_disk

    need_tools("qemu-nbd")
    size = 1024 * MIB
    source = tmp_path / "source.img"
    with open(source, "wb") as f:
        f.truncate(size)
        for at in (0, 300 * MIB, size - 4 * MIB):
            f.seek(at)
            f.write(os.urandom(3 * MIB))
    target = tmp_path / "target.img"
    target.write_bytes(b"")
    os.truncate(target, size)
    site = SiteConfig(Paths(tmp_path / "etc", tmp_path / "cache"))
    allocated: dict[str, int] = {}

    def spy(name: str, real: Callable[..., None], staging_arg: int) -> Callable[..., None]:
        """``real``, recording how much of the staging file is allocated when it is fullest."""
        def call(*args: Any) -> None:
            before = os.stat(args[staging_arg]).st_blocks
            real(*args)
            allocated[name] = max(before, os.stat(args[staging_arg]).st_blocks) * 512
        return call

    from instance_cloudimage.disk import staging

    monkeypatch.setattr(staging, "copy_from_uri", spy("export", staging.copy_from_uri, 1))
    monkeypatch.setattr(import_disk, "copy_to_uri", spy("import", import_disk.copy_to_uri, 0))
    stream = tmp_path / "stream"
    with nbd_served(source) as uri, open(stream, "wb") as out:
        env = transfer_env(Path("/nonexistent/os"), uri, "export", size)
        export.run_export(parse_environment(env, Script.EXPORT), site, out.fileno())
    with nbd_served(target) as uri, open(stream, "rb") as src:
        env = transfer_env(Path("/nonexistent/os"), uri, "import", size)
        import_disk.run_import(parse_environment(env, Script.IMPORT), site, src)
    assert 9 * MIB <= allocated["export"] < 16 * MIB, allocated
    assert 9 * MIB <= allocated["import"] < 16 * MIB, allocated
    assert subprocess.run(["cmp", source, target], check=False).returncode == 0
    assert list((tmp_path / "cache" / "staging").iterdir()) == []
