"""One download per cluster: cache export on one node, cache import on another, a create there
that transfers no image bytes; and import treating its file as untrusted input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.httpfixtures import Server, ServerState, make_qcow2, write_site

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "instance-cloudimage"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_qcow2(tmp_path_factory.mktemp("img"), "i1", 3, seed=41)


@pytest.fixture
def state(image: bytes) -> Iterator[ServerState]:
    st = ServerState()
    st.files["/pub/i1.qcow2"] = image
    st.files["/pub/SHA512SUMS"] = f"{hashlib.sha512(image).hexdigest()}  i1.qcow2\n".encode()
    srv = Server(st)
    yield st
    srv.stop()


def cache_cmd(cfg: Path, cache_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(CLI), "cache", *args, "--config-dir", os.fspath(cfg),
                           "--cache-dir", os.fspath(cache_dir)], capture_output=True, text=True, timeout=120)


def entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "images").iterdir())


def exported(tmp_path: Path, state: ServerState, image: bytes) -> tuple[Path, Path]:
    """The image fetched into a first node's cache and exported to a file: (config dir, file)."""
    cfg = write_site(tmp_path / "etc")
    (cfg / "variants").mkdir()
    (cfg / "variants" / "pinned.conf").write_text(
        "[Variant]\nArchitectures = x86_64\nSeed = none\n"  # the test image has no filesystem
        f"[Image]\nURL = {state.url('/pub/i1.qcow2')}\nChecksum = sha256:{hashlib.sha256(image).hexdigest()}\n")
    (cfg / "variants" / "sums.conf").write_text(
        "[Variant]\nArchitectures = x86_64\nSeed = none\n"
        f"[Image]\nURL = {state.url('/pub/i1.qcow2')}\nChecksumURL = {state.url('/pub/SHA512SUMS')}\n")
    fetch = cache_cmd(cfg, tmp_path / "node1", "fetch", "pinned", "--arch", "x86_64")
    assert fetch.returncode == 0, fetch.stderr
    digest = fetch.stdout.split()[2]
    out = tmp_path / "entry.cie"
    exp = cache_cmd(cfg, tmp_path / "node1", "export", digest, os.fspath(out))
    assert exp.returncode == 0, exp.stderr
    assert exp.stdout.startswith(f"exported {digest} ")
    return cfg, out


@pytest.mark.parametrize("variant", ["pinned", "sums"])
def test_one_download_per_cluster(tmp_path: Path, state: ServerState, image: bytes, variant: str) -> None:
    cfg, out = exported(tmp_path, state, image)
    manifest, _, rest = out.read_bytes().partition(b"\n")
    assert json.loads(manifest) == {"format": "instance-cloudimage-cache-entry/1", "size": len(image),
                                    "sha256": hashlib.sha256(image).hexdigest(),
                                    "sha512": hashlib.sha512(image).hexdigest()}
    assert rest == image
    assert oct(out.stat().st_mode & 0o777) == "0o600"

    node2 = tmp_path / "node2"
    imp = cache_cmd(cfg, node2, "import", os.fspath(out))
    assert imp.returncode == 0, imp.stderr
    assert imp.stdout.startswith(f"imported sha256:{hashlib.sha256(image).hexdigest()} ")
    assert list((node2 / "tmp").iterdir()) == []
    again = cache_cmd(cfg, node2, "import", os.fspath(out))
    assert again.returncode == 0 and again.stdout.startswith("already cached: sha256:"), again.stderr

    before = len(state.log)
    disk = tmp_path / "d.img"
    create = subprocess.run([os.fspath(CLI), "create", "--disk", os.fspath(disk), "--disk-size", "16M",
                             "--variant", variant, "--config-dir", os.fspath(cfg), "--cache-dir", os.fspath(node2)],
                            capture_output=True, text=True, timeout=120)
    assert create.returncode == 0, create.stderr
    assert "using the cached image (verified " in create.stderr
    # The image was sent once in all, to the first node; the second asked at most for the checksum file.
    assert [(r.method, r.path, r.status) for r in state.log if r.path == "/pub/i1.qcow2"] == \
        [("GET", "/pub/i1.qcow2", 200)]
    assert [r.path for r in state.log[before:]] == ([] if variant == "pinned" else ["/pub/SHA512SUMS"])
    if variant == "pinned":
        assert len(state.log) == 1  # one GET in total
    src = tmp_path / "i1.qcow2"
    src.write_bytes(image)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", os.fspath(disk), os.fspath(src)],
                   check=True)


def tamper(path: Path, how: str) -> None:
    data = path.read_bytes()
    manifest, _, body = data.partition(b"\n")
    fields = json.loads(manifest)
    if how == "flipped byte":
        body = body[:1000] + bytes([body[1000] ^ 1]) + body[1001:]
    elif how == "wrong sha512":
        fields["sha512"] = "0" * 128
    elif how == "truncated":
        body = body[:-1]
    elif how == "trailing byte":
        body += b"\0"
    elif how == "a path in the manifest":
        fields["path"] = "../../../etc/passwd"
    elif how == "size as text":
        fields["size"] = str(fields["size"])
    elif how == "another format":
        path.write_bytes(b'{"format": "instance-cloudimage-cache-entry/2"}\n' + body)
        return
    elif how == "the bare image":
        path.write_bytes(body)
        return
    elif how == "endless first line":
        path.write_bytes(b"{" + b" " * 5000 + b"\n" + body)
        return
    path.write_bytes(json.dumps(fields).encode() + b"\n" + body)


NOT_OURS = "; nothing was imported (make it with 'instance-cloudimage cache export' on the node that has the image)"
COPY_AGAIN = "; nothing was imported (copy the file again from the node that exported it)"
REFUSALS = {
    "flipped byte": "does not match the sha256 its manifest names" + COPY_AGAIN,
    "wrong sha512": "does not match the sha512 its manifest names" + COPY_AGAIN,
    "truncated": "is not an instance-cloudimage cache export (the manifest names {size} bytes of image, "
                 "the file holds {less})" + NOT_OURS,
    "trailing byte": "is not an instance-cloudimage cache export (the manifest names {size} bytes of image, "
                     "the file holds {more})" + NOT_OURS,
    "a path in the manifest": "is not an instance-cloudimage cache export (its manifest is malformed)" + NOT_OURS,
    "size as text": "is not an instance-cloudimage cache export (its manifest is malformed)" + NOT_OURS,
    "another format": "is not an instance-cloudimage cache export (its first line is not a manifest of format "
                      "instance-cloudimage-cache-entry/1)" + NOT_OURS,
    "the bare image": "is not an instance-cloudimage cache export (no manifest line in its first "
                      "4096 bytes)" + NOT_OURS,
    "endless first line": "is not an instance-cloudimage cache export (no manifest line in its first "
                          "4096 bytes)" + NOT_OURS,
}


@pytest.mark.parametrize("how", sorted(REFUSALS))
def test_import_refuses_anything_else_with_one_line(tmp_path: Path, state: ServerState, image: bytes,
                                                    how: str) -> None:
    cfg, out = exported(tmp_path, state, image)
    tamper(out, how)
    node2 = tmp_path / "node2"
    imp = cache_cmd(cfg, node2, "import", os.fspath(out))
    assert imp.returncode == 1
    expected = REFUSALS[how].format(size=len(image), less=len(image) - 1, more=len(image) + 1)
    assert imp.stderr.splitlines() == [f"instance-cloudimage: error: {out} {expected}"]
    assert entries(node2) == [] and list((node2 / "tmp").iterdir()) == []


def test_import_of_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    cfg = write_site(tmp_path / "etc")
    fifo = tmp_path / "entry.fifo"
    os.mkfifo(fifo)
    imp = cache_cmd(cfg, tmp_path / "node2", "import", os.fspath(fifo))  # without O_NONBLOCK: a timeout
    assert imp.returncode == 1
    assert imp.stderr.splitlines()[0].startswith(f"instance-cloudimage: error: {fifo} is not an "
                                                 "instance-cloudimage cache export (not a regular file)")


def test_import_keeps_to_the_size_limits(tmp_path: Path, state: ServerState, image: bytes) -> None:
    cfg, out = exported(tmp_path, state, image)
    for section, key, name in (("Images", "MaxDownloadSize", "[Images] MaxDownloadSize"),
                               ("Cache", "MaxSize", "[Cache] MaxSize")):
        small = write_site(tmp_path / f"etc-{key}", {section: {key: "64K"}})
        imp = cache_cmd(small, tmp_path / f"node-{key}", "import", os.fspath(out))
        assert imp.returncode == 1
        assert len(imp.stderr.splitlines()) == 1
        assert "holds an image of " in imp.stderr
        assert f"more than {name} (64.0 KiB); nothing was imported" in imp.stderr
        assert entries(tmp_path / f"node-{key}") == []


def test_export_names_one_cached_image(tmp_path: Path, state: ServerState, image: bytes) -> None:
    cfg, out = exported(tmp_path, state, image)
    prefix = hashlib.sha256(image).hexdigest()[:16]  # as 'cache list' shows it
    assert cache_cmd(cfg, tmp_path / "node1", "export", prefix, os.fspath(tmp_path / "b")).returncode == 0
    assert (tmp_path / "b").read_bytes() == out.read_bytes()
    for digest, message in (("0" * 64, f"no cached image with sha256 {'0' * 64} "
                                       "(see 'instance-cloudimage cache list')"),
                            ("abc", "'abc' is not a sha256 digest (give sha256:HEX as 'cache fetch' prints it, "
                                    "or 12 or more hex digits)")):
        r = cache_cmd(cfg, tmp_path / "node1", "export", digest, os.fspath(tmp_path / "c"))
        assert r.returncode == 1 and r.stderr.splitlines() == [f"instance-cloudimage: error: {message}"]
        assert not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left
