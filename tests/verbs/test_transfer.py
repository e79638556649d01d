"""export → import round trips through the real installed scripts, with a Ganeti-like environment.

The scripts are installed with ``install_os`` (as on a node), run with the variables Ganeti's
import-export daemon passes (including its non-reset LC_ALL=C environment) and EXP_SIZE_FD as a
real pipe.  Disks are sparse files with data islands, and loop block devices.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.disk import exportstream as ds
from instance_cloudimage.disk import importstream as ims
from instance_cloudimage.ganeti.env import Script
from instance_cloudimage.ganeti.simulate import SimulatedDisk, SimulatedTransfer, simulated_environment
from instance_cloudimage.runtime.siteconfig import Paths

MIB = 1024 * 1024
DISK_SIZE = 64 * MIB
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def os_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two installed OS definitions: default site config, and one exporting with zstd."""
    out = {}
    for name, conf in (("plain", None), ("zstd", "[Export]\nCompression = zstd\nZstdLevel = 3\n"),
                       ("raw", "[Export]\nFormat = raw\n")):
        base = tmp_path_factory.mktemp(name)
        etc = base / "etc"
        etc.mkdir()
        if conf:
            (etc / "defaults.conf").write_text(conf)
        os_dir = base / "os" / "cloudimage"
        install_os(os_dir, Paths(etc, base / "cache"))
        out[name] = os_dir
    return out


def make_disk(path: Path, size: int = DISK_SIZE) -> bytes:
    """A sparse disk with data islands, allocated zeros and zero blocks inside data; returns its bytes."""
    rnd = hashlib.shake_256(path.name.encode())
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(rnd.digest(8192))
        f.seek(MIB + 512)  # not block-aligned
        f.write(rnd.digest(3000)[::-1])
        f.seek(4 * MIB)
        f.write(bytes(MIB))  # allocated, but zeros
        mixed = bytearray(rnd.digest(6 * MIB))
        for i in range(0, len(mixed), 3 * 4096):
            mixed[i:i + 4096] = bytes(4096)  # zero blocks inside a data extent
        f.seek(20 * MIB + 4096)
        f.write(mixed)
        f.seek(size - 4096)
        f.write(b"\xff" * 4096)  # the very last block
    return path.read_bytes()


def make_target(path: Path, size: int = DISK_SIZE, dirty: bool = False) -> None:
    with open(path, "wb") as f:
        if dirty:  # a reused device: every gap must be zeroed by the import
            for _ in range(size // MIB):
                f.write(b"\xa5" * MIB)
        f.truncate(size)


def ganeti_env(os_dir: Path, disk: str | SimulatedDisk, verb: str, *, size_fd: int | None = None,
               variant: str = "demo", debug: bool = False, old_name: str | None = None) -> dict[str, str]:
    """What Ganeti passes ``verb`` (export or import of disk 0, or rename) for an instance with one
    disk (a path: its size read from it) and one NIC."""
    transfer = SimulatedTransfer(Script(verb), 0, size_fd=size_fd) if verb in ("export", "import") else None
    if not isinstance(disk, SimulatedDisk):
        disk = SimulatedDisk(disk, size_mib=os.stat(disk).st_size // MIB or 1)
    env = simulated_environment(variant, [disk], os_name=os_dir.name, instance_name="inst1.example.test",
                                instance_uuid="68c41cfd-8b97-4cda-8ba0-674afdb4b6bd", nics=["aa:00:00:1f:5b:b3"],
                                debug=debug, old_name=old_name, transfer=transfer)
    # What a live cluster also passes about the nodes, backend parameters and NIC (Appendix A).
    env |= {"INSTANCE_PRIMARY_NODE": "node-uuid", "INSTANCE_SECONDARY_NODES": "", "INSTANCE_BE_maxmem": "128",
            "NIC_0_MODE": "bridged", "NIC_0_LINK": "gntbr0", "NIC_0_BRIDGE": "gntbr0"}
    if transfer is not None:  # noded's own environment: the import-export daemon does not reset it
        env |= {"HOME": "/root", "LANG": "C.UTF-8", "OLDPWD": "/"}
    return env


@dataclass
class Ran:
    returncode: int
    stderr: str
    announced: str | None = None


def export(os_dir: Path, disk: str, out: Path) -> Ran:
    r, w = os.pipe()
    try:
        env = ganeti_env(os_dir, disk, "export", size_fd=w)
        with open(out, "wb") as stdout:
            proc = subprocess.run([os_dir / "export"], env=env, cwd=os_dir, stdin=subprocess.DEVNULL,
                                  stdout=stdout, stderr=subprocess.PIPE, pass_fds=(w,), check=False)
        os.close(w)
        w = -1
        with os.fdopen(r, "r") as f:
            r = -1
            announced = f.read()
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    return Ran(proc.returncode, proc.stderr.decode(), announced)


def import_(os_dir: Path, target: str, stream: Path | bytes) -> Ran:
    env = ganeti_env(os_dir, target, "import", size_fd=11)
    if isinstance(stream, bytes):
        proc = subprocess.run([os_dir / "import"], env=env, cwd=os_dir, input=stream,
                              capture_output=True, check=False)
    else:
        with open(stream, "rb") as stdin:
            proc = subprocess.run([os_dir / "import"], env=env, cwd=os_dir, stdin=stdin,
                                  capture_output=True, check=False)
    return Ran(proc.returncode, proc.stderr.decode())


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    dev = subprocess.run(["losetup", "--find", "--show", path], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# --- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavour", ["plain", "zstd"])
@pytest.mark.parametrize("dirty", [False, True], ids=["fresh-target", "dirty-target"])
def test_round_trip_file_to_file(tmp_path: Path, os_dirs: dict[str, Path], flavour: str, dirty: bool) -> None:
    disk = tmp_path / "disk0"
    content = make_disk(disk)
    stream = tmp_path / "stream"
    ran = export(os_dirs[flavour], os.fspath(disk), stream)
    assert ran.returncode == 0, ran.stderr
    header = ims.parse_header(stream.read_bytes()[:ds.HEADER.size])
    assert header.disk_size == DISK_SIZE and header.compressed == (flavour == "zstd")
    data = 8192 + 3000 + 6 * MIB * 2 // 3 + 4096
    assert stream.stat().st_size < data + 64 * 1024  # sparse regions and zero blocks cost nothing
    # EXP_SIZE_FD: one line, an upper estimate of the uncompressed stream, below the disk size.
    assert ran.announced is not None and ran.announced.endswith("\n")
    announced = int(ran.announced)
    assert data < announced < DISK_SIZE

    target = tmp_path / "target"
    make_target(target, dirty=dirty)
    ran = import_(os_dirs["plain"], os.fspath(target), stream)  # the importer needs no site config
    assert ran.returncode == 0, ran.stderr
    assert target.read_bytes() == content
    if not dirty:
        assert allocated(target) < 16 * MIB  # the fresh sparse target stayed sparse
    else:
        assert allocated(target) < DISK_SIZE  # gaps were punched, not written


@pytest.mark.integration
@pytest.mark.skipif(not ROOT, reason="loop devices need root")
@pytest.mark.parametrize("flavour", ["plain", "zstd"])
def test_round_trip_loop_devices(tmp_path: Path, os_dirs: dict[str, Path], flavour: str) -> None:
    disk = tmp_path / "disk0"
    content = make_disk(disk)
    target = tmp_path / "target"
    make_target(target, dirty=True)
    stream = tmp_path / "stream"
    with loop_device(disk) as src_dev, loop_device(target) as dst_dev:
        ran = export(os_dirs[flavour], src_dev, stream)
        assert ran.returncode == 0, ran.stderr
        # A block device has no holes to ask for: the estimate is the disk's size, yet zero
        # blocks were still left out of the stream.
        assert ran.announced is not None and int(ran.announced) >= DISK_SIZE
        assert stream.stat().st_size < 8 * MIB
        ran = import_(os_dirs["plain"], dst_dev, stream)
        assert ran.returncode == 0, ran.stderr
        with open(dst_dev, "rb") as f:
            assert f.read() == content
    assert target.read_bytes() == content


def test_raw_export_format(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    disk = tmp_path / "disk0"
    content = make_disk(disk)
    stream = tmp_path / "stream"
    ran = export(os_dirs["raw"], os.fspath(disk), stream)
    assert ran.returncode == 0, ran.stderr
    assert ran.announced == f"{DISK_SIZE}\n"
    assert stream.read_bytes() == content


@pytest.mark.parametrize("dirty", [False, True], ids=["fresh-target", "dirty-target"])
def test_import_of_a_raw_stream(tmp_path: Path, os_dirs: dict[str, Path], dirty: bool) -> None:
    """Another provider's export: plain dd output, no header."""
    disk = tmp_path / "disk0"
    content = make_disk(disk)
    target = tmp_path / "target"
    make_target(target, dirty=dirty)
    ran = import_(os_dirs["plain"], os.fspath(target), disk)
    assert ran.returncode == 0, ran.stderr
    assert target.read_bytes() == content
    assert allocated(target) < DISK_SIZE  # zero blocks became holes


def test_raw_stream_shorter_than_the_disk_warns(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    target = tmp_path / "target"
    make_target(target)
    ran = import_(os_dirs["plain"], os.fspath(target), b"\x01" * 10000)
    assert ran.returncode == 0
    assert "shorter than the disk" in ran.stderr
    assert target.read_bytes()[:10001] == b"\x01" * 10000 + b"\0"


# --- broken streams: a clear error and a non-zero exit ------------------------------------------------

@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory, os_dirs: dict[str, Path]) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("streams")
    disk = base / "disk0"
    make_disk(disk)
    out = {}
    for flavour in ("plain", "zstd"):
        ran = export(os_dirs[flavour], os.fspath(disk), base / flavour)
        assert ran.returncode == 0, ran.stderr
        out[flavour] = (base / flavour).read_bytes()
    return out


def assert_refused(ran: Ran, *phrases: str) -> None:
    assert ran.returncode != 0
    last = ran.stderr.strip().splitlines()[-1]
    assert last.startswith("cloudimage import: error: "), ran.stderr
    assert any(p in last for p in phrases), last
    assert "Traceback" not in ran.stderr


def blanked_or_untouched(target: Path, ran: Ran) -> bool:
    """Ganeti reports a failed import as a success (docs/lifecycle.md), so a disk the import had
    started to write must not boot: its first and last MiB read as zeros, and the log says so
    (True).  A stream refused before any write leaves the disk as it was (False).  The target
    starts dirty (0xa5), so zeros there were written by the import, not left from a fresh disk."""
    data = target.read_bytes()
    if "left unbootable (its first and last MiB zeroed) because the import failed" in ran.stderr:
        assert data[:MIB] == bytes(MIB) and data[-MIB:] == bytes(MIB)
        return True
    assert data == b"\xa5" * len(data), "a failed import changed the disk without blanking it"
    return False


@pytest.mark.parametrize("flavour", ["plain", "zstd"])
@pytest.mark.parametrize("keep", [10, 30, 1000, 0.5, -40, -1])
def test_truncated_stream(tmp_path: Path, os_dirs: dict[str, Path], streams: dict[str, bytes], flavour: str,
                          keep: float) -> None:
    data = streams[flavour]
    cut = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep
    target = tmp_path / "target"
    make_target(target, dirty=True)
    ran = import_(os_dirs["plain"], os.fspath(target), data[:cut])
    assert_refused(ran, "truncated")
    blanked = blanked_or_untouched(target, ran)
    if flavour == "plain":  # a record is written once it is whole: cut within the first, nothing was
        assert blanked == (keep in (0.5, -40, -1)), (cut, blanked)


@pytest.mark.parametrize("flavour", ["plain", "zstd"])
@pytest.mark.parametrize("where", [0.3, 0.7, -5])
def test_corrupt_stream(tmp_path: Path, os_dirs: dict[str, Path], streams: dict[str, bytes], flavour: str,
                        where: float) -> None:
    data = bytearray(streams[flavour])
    pos = int(len(data) * where) if where > 0 else len(data) + int(where)
    data[pos] ^= 0x40
    target = tmp_path / "target"
    make_target(target, dirty=True)
    ran = import_(os_dirs["plain"], os.fspath(target), bytes(data))
    assert_refused(ran, "corrupt", "checksum mismatch", "truncated")
    blanked = blanked_or_untouched(target, ran)
    assert blanked or flavour == "zstd", "a plain stream corrupted after its first record wrote data"


def test_stream_for_a_larger_disk(tmp_path: Path, os_dirs: dict[str, Path], streams: dict[str, bytes]) -> None:
    target = tmp_path / "target"
    make_target(target, size=DISK_SIZE // 2)
    ran = import_(os_dirs["plain"], os.fspath(target), streams["plain"])
    assert_refused(ran, "larger than the target")
    assert allocated(target) == 0  # refused before anything was written


def test_raw_stream_larger_than_the_disk(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    target = tmp_path / "target"
    make_target(target, size=MIB)
    ran = import_(os_dirs["plain"], os.fspath(target), b"\x01" * (MIB + 1))
    assert_refused(ran, "larger than the target")


def test_damaged_magic_is_not_taken_for_a_raw_disk(tmp_path: Path, os_dirs: dict[str, Path],
                                                   streams: dict[str, bytes]) -> None:
    data = bytearray(streams["plain"])
    data[0] = 0x09  # the high bit stripped in transit
    target = tmp_path / "target"
    make_target(target)
    ran = import_(os_dirs["plain"], os.fspath(target), bytes(data))
    assert_refused(ran, "header is damaged")
    assert allocated(target) == 0


@pytest.mark.parametrize("flavour", ["plain", "zstd"])
def test_trailing_data(tmp_path: Path, os_dirs: dict[str, Path], streams: dict[str, bytes], flavour: str) -> None:
    target = tmp_path / "target"
    make_target(target)
    ran = import_(os_dirs["plain"], os.fspath(target), streams[flavour] + b"garbage")
    assert_refused(ran, "data after its end record", "corrupt")


def test_future_version_and_flags(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    target = tmp_path / "target"
    make_target(target)
    for header, phrase in ((ds.HEADER.pack(ds.MAGIC, 2, 0, 0, MIB), "format version 2"),
                           (ds.HEADER.pack(ds.MAGIC, 1, 0x80, 0, MIB), "unknown features")):
        assert_refused(import_(os_dirs["plain"], os.fspath(target), header), phrase)


def stream_of(records: list[tuple[int, bytes]], disk_size: int, end: tuple[int, int, int] | None = None) -> bytes:
    """A hand-made uncompressed stream (with a valid checksum unless told otherwise)."""
    body = ds.HEADER.pack(ds.MAGIC, 1, 0, 0, disk_size)
    for offset, data in records:
        body += ds.DATA.pack(ds.DATA_TAG, offset, len(data)) + data
    total = sum(len(d) for _, d in records)
    body += ds.END.pack(ds.END_TAG, *(end or (disk_size, total, len(records))))
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("records, end, phrase", [
    ([(8192, b"a" * 10), (0, b"b" * 10)], None, "out of order"),
    ([(0, b"a" * 100), (50, b"b" * 10)], None, "out of order"),
    ([(MIB - 5, b"a" * 10)], None, "out of the disk"),
    ([(0, b"")], None, "out of order or out of the disk"),
    ([(0, b"a" * 10)], (MIB, 11, 1), "end record does not match"),
    ([(0, b"a" * 10)], (MIB, 10, 2), "end record does not match"),
])
def test_inconsistent_records(tmp_path: Path, os_dirs: dict[str, Path], records: list[tuple[int, bytes]],
                              end: tuple[int, int, int] | None, phrase: str) -> None:
    target = tmp_path / "target"
    make_target(target, size=MIB)
    assert_refused(import_(os_dirs["plain"], os.fspath(target), stream_of(records, MIB, end)), phrase)


def test_hand_made_stream_is_accepted(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    """The format as documented, written independently of the exporter, imports correctly."""
    target = tmp_path / "target"
    make_target(target, size=2 * MIB, dirty=True)
    ran = import_(os_dirs["plain"], os.fspath(target), stream_of([(100, b"x" * 7), (MIB, b"y" * 4096)], 2 * MIB))
    assert ran.returncode == 0, ran.stderr
    want = bytearray(2 * MIB)
    want[100:107] = b"x" * 7
    want[MIB:MIB + 4096] = b"y" * 4096
    assert target.read_bytes() == want


def test_unknown_record_type(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    target = tmp_path / "target"
    make_target(target, size=MIB)
    data = ds.HEADER.pack(ds.MAGIC, 1, 0, 0, MIB) + b"HOLE" + struct.pack("<QI", 0, 10)
    assert_refused(import_(os_dirs["plain"], os.fspath(target), data), "unknown record type")


# --- rename --------------------------------------------------------------------------------------------

def test_rename_exits_zero(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    disk = tmp_path / "disk0"
    make_target(disk)
    env = ganeti_env(os_dirs["plain"], os.fspath(disk), "rename", old_name="old.example.test")
    proc = subprocess.run([os_dirs["plain"] / "rename"], env=env, cwd=os_dirs["plain"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "renamed old.example.test to inst1.example.test" in proc.stderr


def test_rename_to_the_same_name_is_one_line_and_touches_nothing(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    """What Ganeti runs after an import under the exported name, through the real script."""
    disk = tmp_path / "disk0"
    make_target(disk)
    disk.write_bytes(os.urandom(64 * 1024) + disk.read_bytes()[64 * 1024:])
    before = disk.read_bytes()
    env = ganeti_env(os_dirs["plain"], os.fspath(disk), "rename", old_name="inst1.example.test")
    proc = subprocess.run([os_dirs["plain"] / "rename"], env=env, cwd=os_dirs["plain"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "cloudimage rename: the name inst1.example.test did not change; "
        "no disk was looked at or written"]
    assert disk.read_bytes() == before


def test_rename_survives_a_broken_site_config(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    import json

    os_dir = tmp_path / "os" / "cloudimage"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "defaults.conf").write_text("[Nonsense]\nKey = 1\n")
    install_os(os_dir, Paths(etc, tmp_path / "cache"))
    assert json.loads((os_dir / "instance-cloudimage.json").read_text())["config_dir"] == os.fspath(etc)
    disk = tmp_path / "disk0"
    make_target(disk)
    env = ganeti_env(os_dir, os.fspath(disk), "rename", old_name="old.example.test")
    proc = subprocess.run([os_dir / "rename"], env=env, cwd=os_dir, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "unknown setting [Nonsense] Key" in proc.stderr and "renaming with the default settings" in proc.stderr
    export_env = ganeti_env(os_dir, os.fspath(disk), "export")
    proc = subprocess.run([os_dir / "export"], env=export_env, cwd=os_dir, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "unknown setting [Nonsense] Key" in proc.stderr


def test_empty_import_stream_is_refused(tmp_path: Path, os_dirs: dict[str, Path]) -> None:
    """No disk is zero bytes long: an empty stream is a transfer that never started, not success."""
    target = tmp_path / "target"
    make_target(target, dirty=True)
    ran = import_(os_dirs["plain"], os.fspath(target), b"")
    assert_refused(ran, "the import stream is empty")
    assert not blanked_or_untouched(target, ran)  # untouched


@pytest.mark.parametrize("flavour", ["plain", "raw"])
def test_export_to_a_reader_that_went_away(tmp_path: Path, os_dirs: dict[str, Path], flavour: str) -> None:
    disk = tmp_path / "disk0"
    make_disk(disk)
    os_dir = os_dirs[flavour]
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([os_dir / "export"], env=ganeti_env(os_dir, os.fspath(disk), "export"), cwd=os_dir,
                              stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE, check=False)
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == (
        "cloudimage export: error: the export stream's reader went away after 0 bytes "
        "(the import side or the transfer failed; see its log)")
    assert "Traceback" not in err
