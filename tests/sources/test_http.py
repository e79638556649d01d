"""Remote images against a real HTTP(S) server on 127.0.0.1 (tests/httpfixtures.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from email.utils import formatdate
from pathlib import Path

import pytest

from instance_cloudimage.runtime.errors import ChecksumMismatch, ImageFetchError, ImageTooLarge, ParameterError
from instance_cloudimage.runtime.siteconfig import Paths, SiteConfig, load_site_config
from instance_cloudimage.sources.fetch import FetchedImage, ImageRef, fetch_image, open_image
from tests.support.httpfixtures import Server, ServerState, make_cert, make_qcow2, write_site

pytestmark = pytest.mark.integration

CLI = Path(sys.executable).parent / "instance-cloudimage"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_qcow2(tmp_path_factory.mktemp("img"), "img", 6, seed=1)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_state(cert: tuple[Path, Path]) -> Iterator[ServerState]:
    st = ServerState()
    srv = Server(st, tls=cert)
    yield st
    srv.stop()


def site_for(tmp_path: Path, sections: dict[str, dict[str, str]] | None = None,
             cabundle: Path | None = None) -> SiteConfig:
    cfg = write_site(tmp_path / "etc", sections, cabundle=cabundle)
    return load_site_config(Paths(cfg, tmp_path / "cache"))


def param_ref(url: str, checksum: str | None = None) -> ImageRef:
    return ImageRef(location=url, declared_format="auto", checksum=checksum, from_parameter=True)


def variant_ref(url: str, checksum: str | None = None) -> ImageRef:
    return ImageRef(location=url, declared_format="auto", checksum=checksum, variant="test")


def fetch(ref: ImageRef, site: SiteConfig) -> tuple[FetchedImage, bytes]:
    with ExitStack() as stack:
        fetched = fetch_image(ref, site, stack)
        return fetched, fetched.path.read_bytes()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def cached_images(site: SiteConfig) -> list[str]:
    d = site.paths.cache_dir / "images"
    return sorted(p.name for p in d.iterdir() if p.suffix != ".json") if d.is_dir() else []


def temp_files(site: SiteConfig) -> list[str]:
    d = site.paths.cache_dir / "tmp"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# --- transfers ------------------------------------------------------------------------------------

def test_plain_download_is_cached_with_its_digest(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path)
    fetched, data = fetch(param_ref(state.url("/img.qcow2")), site)
    assert data == image
    assert fetched.digest == sha256(image)
    assert cached_images(site) == [hashlib.sha256(image).hexdigest()]
    assert temp_files(site) == []


def test_stream_reads_the_body_while_it_downloads(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path)
    with ExitStack() as stack:
        stream = open_image(param_ref(state.url("/img.qcow2")), site, stack)
        assert stream.peek(4) == b"QFI\xfb"
        got = bytearray()
        buf = bytearray(100_000)
        while n := stream.readinto(buf):
            got += buf[:n]
        fetched = stream.finish()
        assert bytes(got) == image
        assert fetched.path.read_bytes() == image


def test_dropped_connection_resumes_with_range_and_verifies(tmp_path: Path, state: ServerState,
                                                            image: bytes) -> None:
    state.files["/img.qcow2"] = image
    state.drop_after["/img.qcow2"] = [1_000_000, 500_000]
    site = site_for(tmp_path)
    fetched, data = fetch(param_ref(state.url("/img.qcow2"), checksum=sha256(image)), site)
    assert data == image
    reqs = state.requests_for("/img.qcow2")
    assert [r.status for r in reqs] == [200, 206, 206]
    assert reqs[1].headers["Range"] == "bytes=1000000-"
    assert reqs[1].headers["If-Range"].startswith('"')
    assert reqs[2].headers["Range"] == "bytes=1500000-"
    assert sum(r.body_bytes for r in reqs) == len(image)


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    state.drop_after["/img.qcow2"] = [1_000_000]
    state.ignore_range = True
    site = site_for(tmp_path)
    with ExitStack() as stack:
        stream = open_image(param_ref(state.url("/img.qcow2"), checksum=sha256(image)), site, stack)
        got = b"".join(iter(lambda: stream.read(65536), b""))
        assert got == image  # the consumer saw every byte exactly once
        assert stream.finish().digest == sha256(image)
    assert [r.status for r in state.requests_for("/img.qcow2")] == [200, 200]


def test_file_changed_during_download_is_an_error(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    state.drop_after["/img.qcow2"] = [1_000_000]
    state.validators = False  # no If-Range possible: the retry is a full GET

    site = site_for(tmp_path)
    with ExitStack() as stack:
        stream = open_image(param_ref(state.url("/img.qcow2")), site, stack)
        assert stream.peek(1_000_000)[:4] == b"QFI\xfb"
        state.files["/img.qcow2"] = b"X" * len(image)
        with pytest.raises(ImageFetchError, match="changed on the server"):
            stream.finish()
    assert cached_images(site) == []
    assert temp_files(site) == []


def test_checksum_mismatch_is_an_error_and_nothing_is_cached(tmp_path: Path, state: ServerState,
                                                             image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ChecksumMismatch, match="does not match its sha256 checksum; nothing was cached"):
        fetch(param_ref(state.url("/img.qcow2"), checksum=wrong), site)
    assert cached_images(site) == []
    assert temp_files(site) == []
    assert not list((site.paths.cache_dir / "urls").iterdir())


def test_streaming_reader_never_sees_eof_on_a_mismatch(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path)
    with ExitStack() as stack:
        stream = open_image(param_ref(state.url("/img.qcow2"), checksum="sha512:" + "0" * 128), site, stack)
        with pytest.raises(ChecksumMismatch):
            while stream.read(65536):
                pass


def test_download_larger_than_the_cap_is_refused(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path, {"Images": {"MaxDownloadSize": "1M"}})
    with pytest.raises(ImageTooLarge):
        fetch(param_ref(state.url("/img.qcow2")), site)
    assert cached_images(site) == []


def test_plain_http_parameter_needs_a_checksum(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path, {"Images": {"AllowPlainHTTP": "no"}})
    with pytest.raises(ParameterError, match="needs image_checksum"):
        fetch(param_ref(state.url("/img.qcow2")), site)
    fetched, _ = fetch(param_ref(state.url("/img.qcow2"), checksum=sha256(image)), site)
    assert fetched.digest == sha256(image)
    assert state.body_gets("/img.qcow2")


def test_redirect_from_https_to_plain_http_needs_a_checksum(tmp_path: Path, tls_state: ServerState,
                                                            state: ServerState, image: bytes,
                                                            cert: tuple[Path, Path]) -> None:
    state.files["/img.qcow2"] = image
    tls_state.redirects["/img.qcow2"] = state.url("/img.qcow2")
    site = site_for(tmp_path, {"Images": {"AllowPlainHTTP": "no"}}, cabundle=cert[0])
    with pytest.raises(ImageFetchError, match="a redirect of the URL given by the image parameter leads to a "
                                              "plain http URL"):
        fetch(param_ref(tls_state.url("/img.qcow2")), site)
    assert state.log == []
    _, data = fetch(param_ref(tls_state.url("/img.qcow2"), checksum=sha256(image)), site)
    assert data == image


def test_https_with_the_site_ca_bundle(tmp_path: Path, tls_state: ServerState, image: bytes,
                                       cert: tuple[Path, Path]) -> None:
    tls_state.files["/img.qcow2"] = image
    site = site_for(tmp_path, cabundle=cert[0])
    fetched, data = fetch(param_ref(tls_state.url("/img.qcow2")), site)
    assert data == image


# --- redirects and the address policy ----------------------------------------------------------------

def test_redirect_to_file_url_is_refused(tmp_path: Path, state: ServerState) -> None:
    state.redirects["/img"] = "file:///etc/passwd"
    site = site_for(tmp_path)
    with pytest.raises(ImageFetchError, match="leads to a 'file:' URL; only http and https are followed"):
        fetch(param_ref(state.url("/img")), site)
    with pytest.raises(ImageFetchError, match="only http and https"):
        fetch(variant_ref(state.url("/img")), site)


def test_redirects_are_followed_and_capped(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    state.redirects["/a"] = "/b"
    state.redirects["/b"] = state.url("/img.qcow2")
    state.redirects["/loop"] = "/loop"
    site = site_for(tmp_path, {"HTTP": {"MaxRedirects": "3"}})
    _, data = fetch(param_ref(state.url("/a")), site)
    assert data == image
    with pytest.raises(ImageFetchError, match="redirects more than 3 times"):
        fetch(param_ref(state.url("/loop")), site)


def test_loopback_is_refused_for_the_image_parameter(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path, {"Images": {"AllowPrivateURLs": "no"}})
    for url in (state.url("/img.qcow2"), f"http://localhost:{state.base.rsplit(':', 1)[1]}/img.qcow2"):
        with pytest.raises(ImageFetchError, match="reaches a loopback address") as e:
            fetch(param_ref(url), site)
        assert "127.0.0.1" not in str(e.value) and "localhost" not in str(e.value)
    with pytest.raises(ImageFetchError, match="non-canonical"):
        fetch(param_ref("http://2130706433/img.qcow2"), site)
    with pytest.raises(ImageFetchError, match="non-canonical"):
        fetch(param_ref("http://127.1/img.qcow2"), site)
    assert state.log == []  # nothing reached the server
    # The administrator's variant URLs are not restricted.
    _, data = fetch(variant_ref(state.url("/img.qcow2")), site)
    assert data == image


def test_each_redirect_hop_is_checked(tmp_path: Path, state: ServerState, image: bytes) -> None:
    port = state.base.rsplit(":", 1)[1]
    state.files["/img.qcow2"] = image
    state.redirects["/jump"] = f"http://127.0.0.2:{port}/img.qcow2"
    site = site_for(tmp_path, {"Images": {"AllowPrivateURLs": "no", "AllowedURLNetworks": "127.0.0.1/32"}})
    _, data = fetch(param_ref(state.url("/img.qcow2")), site)
    assert data == image
    with pytest.raises(ImageFetchError, match="a redirect of the URL given by the image parameter reaches a "
                                              "loopback address"):
        fetch(param_ref(state.url("/jump")), site)
    assert [r.path for r in state.log] == ["/img.qcow2", "/jump"]


# --- one clear line through the CLI ------------------------------------------------------------------

def run_cli(tmp_path: Path, name: str, config: Path, params: dict[str, str],
            variant: str = "demo") -> subprocess.CompletedProcess[str]:
    argv = [os.fspath(CLI), "create", "--disk", os.fspath(tmp_path / f"{name}.img"), "--disk-size", "32M",
            "--config-dir", os.fspath(config), "--cache-dir", os.fspath(tmp_path / "cache"), "--variant", variant]
    for k, v in params.items():
        argv += ["-O", f"{k}={v}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_404_is_one_line_without_the_url(tmp_path: Path, state: ServerState) -> None:
    cfg = write_site(tmp_path / "etc")
    proc = run_cli(tmp_path, "d", cfg, {"image": state.url("/missing.qcow2")})
    line = one_error_line(proc)
    assert "the URL given by the image parameter was not found (HTTP 404)" in line
    assert "127.0.0.1" not in proc.stderr and "missing" not in proc.stderr


def test_403_is_one_line(tmp_path: Path, state: ServerState) -> None:
    state.status["/secret"] = 403
    cfg = write_site(tmp_path / "etc")
    line = one_error_line(run_cli(tmp_path, "d", cfg, {"image": state.url("/secret")}))
    assert "access to the URL given by the image parameter is forbidden (HTTP 403)" in line


def test_tls_failure_is_one_line(tmp_path: Path, tls_state: ServerState, image: bytes) -> None:
    tls_state.files["/img.qcow2"] = image
    cfg = write_site(tmp_path / "etc")  # no CA bundle: the self-signed certificate is not trusted
    line = one_error_line(run_cli(tmp_path, "d", cfg, {"image": tls_state.url("/img.qcow2")}))
    assert "TLS verification failed for the URL given by the image parameter" in line
    assert "certificate" in line
    assert tls_state.body_gets("/img.qcow2") == []


def test_timeout_is_one_line(tmp_path: Path, state: ServerState) -> None:
    state.files["/slow"] = b"x"
    state.stall["/slow"] = 4
    cfg = write_site(tmp_path / "etc", {"HTTP": {"ReadTimeout": "1", "Retries": "0"}})
    line = one_error_line(run_cli(tmp_path, "d", cfg, {"image": state.url("/slow")}))
    assert "the URL given by the image parameter sent no data for 1s" in line


def test_dns_failure_is_one_line(tmp_path: Path) -> None:
    cfg = write_site(tmp_path / "etc", {"HTTP": {"Retries": "0"}})
    line = one_error_line(run_cli(tmp_path, "d", cfg, {"image": "https://no-such-host.invalid/x.qcow2"}))
    assert "cannot resolve the host name of the URL given by the image parameter" in line
    assert "invalid" not in line


def test_variant_url_errors_name_the_url(tmp_path: Path, state: ServerState) -> None:
    cfg = write_site(tmp_path / "etc")
    (cfg / "variants").mkdir()
    (cfg / "variants" / "gone.conf").write_text(f"[Image]\nURL = {state.url('/gone.qcow2')}\n")
    line = one_error_line(run_cli(tmp_path, "d", cfg, {}, variant="gone"))
    assert f"{state.url('/gone.qcow2')} was not found (HTTP 404)" in line


# --- concurrency, revalidation, end to end -----------------------------------------------------------

def qemu_compare(disk: Path, image_file: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", os.fspath(disk),
                    os.fspath(image_file)], check=True)


def test_concurrent_creates_download_once_and_a_warm_create_gets_304(tmp_path: Path, state: ServerState,
                                                                       image: bytes) -> None:
    state.files["/img.qcow2"] = image
    src = tmp_path / "img.qcow2"
    src.write_bytes(image)
    cfg = write_site(tmp_path / "etc")
    argvs = []
    for i in range(4):
        argvs.append([os.fspath(CLI), "create", "--disk", os.fspath(tmp_path / f"d{i}.img"), "--disk-size", "32M",
                      "--config-dir", os.fspath(cfg), "--cache-dir", os.fspath(tmp_path / "cache"),
                      "-O", f"image={state.url('/img.qcow2')}", "-O", "seed=none"])  # no guest FS to seed
    procs = [subprocess.Popen(a, stderr=subprocess.PIPE, text=True) for a in argvs]
    outs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert len(state.body_gets("/img.qcow2")) == 1
    for i in range(4):
        qemu_compare(tmp_path / f"d{i}.img", src)

    before = len(state.log)
    proc = run_cli(tmp_path, "warm", cfg, {"image": state.url("/img.qcow2"), "seed": "none"})
    assert proc.returncode == 0, proc.stderr
    new = state.log[before:]
    assert [(r.status, r.body_bytes) for r in new] == [(304, 0)]
    assert new[0].headers.get("If-None-Match")
    qemu_compare(tmp_path / "warm.img", src)


# --- mirrors ---------------------------------------------------------------------------------------

def test_mirror_is_used_when_it_answers(tmp_path: Path, state: ServerState, image: bytes) -> None:
    mirror_state = ServerState()
    mirror = Server(mirror_state)
    try:
        state.files["/pub/img.qcow2"] = image
        mirror_state.files["/m/img.qcow2"] = image
        site = site_for(tmp_path, {"Mirrors": {state.url("/pub/"): mirror_state.url("/m/")}})
        _, data = fetch(variant_ref(state.url("/pub/img.qcow2"), checksum=sha256(image)), site)
        assert data == image
        assert len(mirror_state.body_gets("/m/img.qcow2")) == 1
        assert state.log == []
    finally:
        mirror.stop()


def test_upstream_is_used_when_the_mirror_fails(tmp_path: Path, state: ServerState, image: bytes) -> None:
    mirror_state = ServerState()
    mirror = Server(mirror_state)
    try:
        state.files["/pub/img.qcow2"] = image
        mirror_state.status["/m/img.qcow2"] = 503
        dead = "http://127.0.0.1:9/dead/"  # discard port: connection refused
        site = site_for(tmp_path, {"Mirrors": {state.url("/pub/"): f"{dead} {mirror_state.url('/m/')}"}})
        _, data = fetch(variant_ref(state.url("/pub/img.qcow2")), site)
        assert data == image
        assert [r.status for r in mirror_state.log] == [503, 503, 503]  # retried, then given up
        assert len(state.body_gets("/pub/img.qcow2")) == 1
    finally:
        mirror.stop()


# --- proxies, local files, cancellation --------------------------------------------------------------

def test_site_proxy_is_used_and_no_proxy_bypasses_it(tmp_path: Path, state: ServerState, image: bytes) -> None:
    proxy_state = ServerState()
    proxy = Server(proxy_state)
    try:
        # A proxy receives the absolute URL as the request target.
        proxy_state.files["http://images.example.invalid/img.qcow2"] = image
        state.files["/img.qcow2"] = image
        site = site_for(tmp_path, {"HTTP": {"Proxy": proxy_state.base, "NoProxy": "localhost, 127.0.0.0/8"}})
        _, data = fetch(variant_ref("http://images.example.invalid/img.qcow2"), site)
        assert data == image
        assert [r.path for r in proxy_state.log] == ["http://images.example.invalid/img.qcow2"]
        _, data = fetch(variant_ref(state.url("/img.qcow2")), site)  # bypasses the proxy
        assert data == image and len(proxy_state.log) == 1 and len(state.log) == 1
    finally:
        proxy.stop()


def test_local_paths_obey_the_allowed_directories(tmp_path: Path, image: bytes) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "img.qcow2").write_bytes(image)
    (tmp_path / "outside.qcow2").write_bytes(image)
    (allowed / "link.qcow2").symlink_to(tmp_path / "outside.qcow2")
    site = site_for(tmp_path, {"Images": {"AllowedDirectories": os.fspath(allowed)}})
    for location in (os.fspath(allowed / "img.qcow2"), f"file://{allowed / 'img.qcow2'}"):
        fetched, data = fetch(param_ref(location, checksum=sha256(image)), site)
        assert data == image and fetched.digest == sha256(image)
    for location in (os.fspath(tmp_path / "outside.qcow2"), os.fspath(allowed / "link.qcow2"), "file:///etc/passwd"):
        with pytest.raises(ParameterError):
            fetch(param_ref(location), site)
    with pytest.raises(ChecksumMismatch):
        fetch(param_ref(os.fspath(allowed / "img.qcow2"), checksum="sha256:" + "1" * 64), site)
    assert temp_files(site) == []


def test_closing_a_stream_mid_download_leaves_nothing(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    site = site_for(tmp_path)
    with ExitStack() as stack:
        stream = open_image(param_ref(state.url("/img.qcow2")), site, stack)
        assert stream.read(1000)
    assert temp_files(site) == [] or cached_images(site) == [hashlib.sha256(image).hexdigest()]
    # The URL lock was released: another fetch proceeds at once.
    _, data = fetch(param_ref(state.url("/img.qcow2")), site)
    assert data == image


def test_missing_ca_bundle_is_a_config_error(tmp_path: Path, tls_state: ServerState, image: bytes) -> None:
    # requests raised a bare OSError for it: an internal error with a traceback.
    tls_state.files["/img.qcow2"] = image
    site = site_for(tmp_path, cabundle=tmp_path / "nothing.pem")
    from instance_cloudimage.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"\[HTTP\] CABundle .*nothing.pem does not exist"):
        fetch(variant_ref(tls_state.url("/img.qcow2"), checksum=sha256(image)), site)
    assert tls_state.log == []


# --- Retry-After ------------------------------------------------------------------------------------

def retried_fetch(tmp_path: Path, state: ServerState, image: bytes, caplog: pytest.LogCaptureFixture,
                  answers: list[tuple[int, dict[str, str]]]) -> float:
    """Fetch /img.qcow2 after ``answers``; return the seconds it took (RetryBackoff is 0.05 s)."""
    state.files["/img.qcow2"] = image
    state.answers["/img.qcow2"] = list(answers)  # the server pops them
    caplog.set_level(logging.WARNING, logger="instance_cloudimage")
    start = time.monotonic()
    _, data = fetch(variant_ref(state.url("/img.qcow2")), site_for(tmp_path))
    assert data == image
    assert [r.status for r in state.requests_for("/img.qcow2")] == [a[0] for a in answers] + [200]
    return time.monotonic() - start


def test_503_with_retry_after_seconds_is_waited_for(tmp_path: Path, state: ServerState, image: bytes,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    took = retried_fetch(tmp_path, state, image, caplog, [(503, {"Retry-After": "1"})])
    assert took >= 1.0  # not the 0.05 s backoff
    assert "HTTP 503 asking to retry later; retrying in 1s (attempt 2 of 3)" in caplog.text


def test_429_with_retry_after_as_an_http_date_is_waited_for(tmp_path: Path, state: ServerState, image: bytes,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    when = formatdate(time.time() + 3, usegmt=True)  # whole seconds: at least 2 s from now
    took = retried_fetch(tmp_path, state, image, caplog, [(429, {"Retry-After": when})])
    assert took >= 1.5
    assert "HTTP 429 asking to retry later" in caplog.text


def test_429_without_retry_after_and_a_bad_one_use_the_backoff(tmp_path: Path, state: ServerState, image: bytes,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    retried_fetch(tmp_path, state, image, caplog, [(429, {}), (503, {"Retry-After": "soon"})])
    assert "asking to retry later" not in caplog.text and "retrying in 0s (attempt 3 of 3)" in caplog.text


def test_a_retry_after_beyond_the_cap_ends_the_attempts(tmp_path: Path, state: ServerState, image: bytes) -> None:
    state.files["/img.qcow2"] = image
    state.answers["/img.qcow2"] = [(503, {"Retry-After": "3600"})]
    with pytest.raises(ImageFetchError, match=r"HTTP 503 Service Unavailable, and the server asks to retry "
                                              r"after 3600s, longer than the 300s we wait \(try again later\)"):
        fetch(variant_ref(state.url("/img.qcow2")), site_for(tmp_path))
    assert len(state.requests_for("/img.qcow2")) == 1
