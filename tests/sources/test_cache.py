"""The image cache: LRU eviction, entries in use, corruption, the cache command."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import ChecksumMismatch
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig, load_site_config
from instance_cloudimage.sources.fetch import ImageRef, fetch_image, open_image
from tests.support.httpfixtures import Server, ServerState, make_qcow2, write_site

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "instance-cloudimage"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    d = tmp_path_factory.mktemp("imgs")
    return [make_qcow2(d, f"i{n}", 3, seed=10 + n) for n in range(3)]


@pytest.fixture
def state(images: list[bytes]) -> Iterator[ServerState]:
    st = ServerState()
    for n, data in enumerate(images):
        st.files[f"/i{n}.qcow2"] = data
    srv = Server(st)
    yield st
    srv.stop()


def site_for(tmp_path: Path, sections: dict[str, dict[str, str]] | None = None) -> SiteConfig:
    return load_site_config(Paths(write_site(tmp_path / "etc", sections), tmp_path / "cache"))


def ref(url: str, checksum: str | None = None) -> ImageRef:
    return ImageRef(location=url, declared_format="auto", checksum=checksum, from_parameter=True)


def get(site: SiteConfig, url: str, checksum: str | None = None) -> str:
    with ExitStack() as stack:
        return fetch_image(ref(url, checksum), site, stack).digest


def cached(site: SiteConfig) -> set[str]:
    return {p.name for p in (site.paths.cache_dir / "images").iterdir() if p.suffix != ".json"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_least_recently_used_entry_is_evicted(tmp_path: Path, state: ServerState, images: list[bytes]) -> None:
    cap = len(images[0]) + len(images[1]) + len(images[2]) // 2
    site = site_for(tmp_path, {"Cache": {"MaxSize": str(cap)}})
    get(site, state.url("/i0.qcow2"))
    time.sleep(0.05)
    get(site, state.url("/i1.qcow2"))
    time.sleep(0.05)
    get(site, state.url("/i0.qcow2"))  # 304: i0 is now more recently used than i1
    time.sleep(0.05)
    get(site, state.url("/i2.qcow2"))
    assert cached(site) == {sha(images[0]), sha(images[2])}


def test_an_entry_in_use_is_never_evicted(tmp_path: Path, state: ServerState, images: list[bytes]) -> None:
    site = site_for(tmp_path, {"Cache": {"MaxSize": str(len(images[0]) + len(images[1]) // 2)}})
    with ExitStack() as stack:
        stream = open_image(ref(state.url("/i0.qcow2")), site, stack)
        in_use = stream.finish()
        assert in_use.path.read_bytes() == images[0]
        time.sleep(0.05)
        get(site, state.url("/i1.qcow2"))
        # Over the cap, but i0 is held by this "create": both stay.
        assert cached(site) == {sha(images[0]), sha(images[1])}
        proc = subprocess.run([os.fspath(CLI), "cache", "list", "--config-dir", os.fspath(tmp_path / "etc"),
                               "--cache-dir", os.fspath(tmp_path / "cache")], capture_output=True, text=True)
        assert f"sha256:{sha(images[0])[:16]}" in proc.stdout and "in use" in proc.stdout
    proc = subprocess.run([os.fspath(CLI), "cache", "prune", "--config-dir", os.fspath(tmp_path / "etc"),
                           "--cache-dir", os.fspath(tmp_path / "cache")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "removed 1 images" in proc.stdout
    assert cached(site) == {sha(images[1])}  # i0 was the least recently used


def test_corrupted_entry_is_detected_and_fetched_again(tmp_path: Path, state: ServerState,
                                                       images: list[bytes]) -> None:
    site = site_for(tmp_path)
    url = state.url("/i0.qcow2")
    get(site, url)
    entry = site.paths.cache_dir / "images" / sha(images[0])
    with open(entry, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 16)
    assert get(site, url) == "sha256:" + sha(images[0])
    assert [(r.status, r.body_bytes > 0) for r in state.log] == [(200, True), (304, False), (200, True)]
    assert entry.read_bytes() == images[0]

    # With a pinned checksum the cache is used without any request; corruption is still caught.
    pinned = "sha256:" + sha(images[0])
    assert get(site, url, pinned) == pinned
    assert len(state.log) == 3
    entry.write_bytes(b"garbage")
    assert get(site, url, pinned) == pinned
    assert len(state.body_gets("/i0.qcow2")) == 3


def test_image_larger_than_the_cache_is_used_but_not_kept(tmp_path: Path, state: ServerState,
                                                          images: list[bytes]) -> None:
    site = site_for(tmp_path, {"Cache": {"MaxSize": "1K"}})
    with ExitStack() as stack:
        fetched = fetch_image(ref(state.url("/i1.qcow2")), site, stack)
        assert fetched.path.read_bytes() == images[1]
    assert cached(site) == set()
    assert list((site.paths.cache_dir / "tmp").iterdir()) == []


def cache_cmd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(CLI), "cache", *args, "--config-dir", os.fspath(tmp_path / "etc"),
                           "--cache-dir", os.fspath(tmp_path / "cache")], capture_output=True, text=True, timeout=60)


def test_cache_fetch_prefetches_a_variant_and_create_then_needs_no_image_request(
        tmp_path: Path, state: ServerState, images: list[bytes]) -> None:
    state.files["/pub/SHA256SUMS"] = (
        f"{sha(images[2])}  other.qcow2\n{sha(images[1])} *i1.qcow2\n").encode()
    state.files["/pub/i1.qcow2"] = images[1]
    cfg = write_site(tmp_path / "etc")
    (cfg / "variants").mkdir()
    (cfg / "variants" / "test.conf").write_text(
        "[Variant]\nArchitectures = x86_64 aarch64\nSeed = none\n"  # the test image has no filesystem
        f"[Image]\nURL = {state.url('/pub/i1.qcow2')}\nChecksumURL = {state.url('/pub/SHA256SUMS')}\n")
    proc = cache_cmd(tmp_path, "fetch", "test", "--arch", "x86_64")
    assert proc.returncode == 0, proc.stderr
    assert f"test x86_64 sha256:{sha(images[1])}" in proc.stdout
    listing = cache_cmd(tmp_path, "list").stdout
    assert f"variant test: {state.url('/pub/i1.qcow2')}" in listing and "idle" in listing

    before = len(state.log)
    create = subprocess.run([os.fspath(CLI), "create", "--disk", os.fspath(tmp_path / "d.img"), "--disk-size", "16M",
                             "--variant", "test", "--config-dir", os.fspath(cfg),
                             "--cache-dir", os.fspath(tmp_path / "cache")], capture_output=True, text=True)
    assert create.returncode == 0, create.stderr
    assert [(r.path, r.status) for r in state.log[before:]] == [("/pub/SHA256SUMS", 304)]

    assert "removed 1 images" in cache_cmd(tmp_path, "prune", "--all").stdout
    assert cache_cmd(tmp_path, "list").stdout.startswith("0 images")


def test_name_pattern_picks_the_newest_listed_image(tmp_path: Path, state: ServerState,
                                                    images: list[bytes]) -> None:
    state.files["/f/CHECKSUM"] = (
        f"# Fedora-Cloud-Base-Generic-44-1.9.x86_64.qcow2: {len(images[0])} bytes\n"
        f"SHA256 (Fedora-Cloud-Base-Generic-44-1.9.x86_64.qcow2) = {sha(images[0])}\n"
        f"SHA256 (Fedora-Cloud-Base-Generic-44-1.10.x86_64.qcow2) = {sha(images[1])}\n"
        f"SHA256 (Fedora-Cloud-Base-UKI-44-1.11.x86_64.qcow2) = {sha(images[2])}\n").encode()
    state.files["/f/Fedora-Cloud-Base-Generic-44-1.10.x86_64.qcow2"] = images[1]
    cfg = write_site(tmp_path / "etc")
    (cfg / "variants").mkdir()
    (cfg / "variants" / "fed.conf").write_text(
        f"[Image]\nURL = {state.url('/f/{name}')}\nChecksumURL = {state.url('/f/CHECKSUM')}\n"
        "NamePattern = Fedora-Cloud-Base-Generic-*.{arch}.qcow2\n")
    proc = cache_cmd(tmp_path, "fetch", "fed", "--arch", "x86_64")
    assert proc.returncode == 0, proc.stderr
    assert f"sha256:{sha(images[1])}" in proc.stdout


@pytest.mark.parametrize("variant", ["demo", "debian-12"])
def test_unusable_cache_directory_is_a_config_error(tmp_path: Path, variant: str) -> None:
    # The cache path names a file: the builtin demo image and a download both need the directory.
    (tmp_path / "file").write_text("x")
    cache_dir = tmp_path / "file" / "cache"
    r = subprocess.run([CLI, "cache", "fetch", variant, "--config-dir", os.fspath(tmp_path / "etc"),
                        "--cache-dir", os.fspath(cache_dir)], capture_output=True, text=True, check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"instance-cloudimage: error: the image cache {cache_dir} cannot be used: Not a directory "
        "(check the --cache-dir given to 'instance-cloudimage install')")


def plant_junk(cache_dir: Path) -> tuple[str, str]:
    """What a careless administrator (or a crash) can leave in a cache: a directory and a symlink
    named like entries, index files of the wrong shape, a directory among the temp files."""
    for d in ("images", "urls", "tmp"):
        (cache_dir / d).mkdir(parents=True, exist_ok=True)
    as_dir, as_link = "a" * 64, "c" * 64
    (cache_dir / "images" / as_dir).mkdir()
    os.symlink("/etc/passwd", cache_dir / "images" / as_link)
    (cache_dir / "images" / f"{as_link}.json").write_text('{"sha512": "%s"}' % ("d" * 128))
    (cache_dir / "images" / "b.json").write_text("[1]")
    (cache_dir / "urls" / "k.json").write_text('{"sha256": 5, "source_key": []}')
    (cache_dir / "urls" / "j.json").write_text("not json")
    (cache_dir / "tmp" / "x.part").mkdir()
    return as_dir, as_link


def test_cache_command_survives_junk_in_the_cache(tmp_path: Path) -> None:
    as_dir, as_link = plant_junk(tmp_path / "cache")
    for action in (["list"], ["prune"], ["prune", "--all"]):
        r = subprocess.run([CLI, "cache", *action, "--config-dir", os.fspath(tmp_path / "etc"),
                            "--cache-dir", os.fspath(tmp_path / "cache")], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
    assert os.path.islink(tmp_path / "cache" / "images" / as_link)  # not ours: left alone
    assert Path("/etc/passwd").is_file()


def test_create_survives_junk_in_the_cache(tmp_path: Path, state: ServerState, images: list[bytes]) -> None:
    site = site_for(tmp_path, {"Cache": {"MaxSize": "1"}})  # evicts after the download
    as_dir, as_link = plant_junk(site.paths.cache_dir)
    # A checksum naming the planted entries must find nothing there, not crash.
    assert get(site, state.url("/i0.qcow2"), f"sha256:{sha(images[0])}") == f"sha256:{sha(images[0])}"
    for bogus in (f"sha256:{as_dir}", f"sha256:{as_link}", "sha512:" + "d" * 128):
        with pytest.raises(ChecksumMismatch):
            get(site, state.url("/i1.qcow2"), bogus)


def test_cache_list_json(tmp_path: Path, state: ServerState, images: list[bytes]) -> None:
    site = site_for(tmp_path)
    digest = get(site, state.url("/i0.qcow2"))
    proc = cache_cmd(tmp_path, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert set(listing) == {"images", "total_size", "max_size"}
    (entry,) = listing["images"]
    assert set(entry) == {"sha256", "size", "last_used", "in_use", "sources"}
    assert f"sha256:{entry['sha256']}" == digest and entry["size"] == len(images[0])
    assert entry["in_use"] is False and listing["total_size"] == len(images[0])
    assert listing["max_size"] == 50 * 1024**3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["last_used"])
    assert entry["sources"] == ["image parameter"]  # its URL is never recorded: it may be private
    assert "only" in cache_cmd(tmp_path, "prune", "--json").stderr
