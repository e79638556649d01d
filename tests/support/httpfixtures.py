"""A real HTTP(S) server on 127.0.0.1 with fault injection, for the source and cache tests.

It serves byte strings from a dict, honours Range/If-Range and conditional requests the way
a static web server does, and records every request (method, path, status, body bytes sent,
headers) so that tests can count downloads.  Faults: drop the connection after N body bytes,
ignore Range, answer a fixed status (or, first, a few statuses with their headers), redirect,
stall before answering.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LAST_MODIFIED = formatdate(1_700_000_000, usegmt=True)


@dataclass
class Request:
    method: str
    path: str
    status: int
    body_bytes: int
    headers: dict[str, str]


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    drop_after: dict[str, list[int]] = field(default_factory=dict)  # path -> byte counts, one per request
    stall: dict[str, float] = field(default_factory=dict)
    # path -> (status, headers) answered to the next requests, one each, before the file is served
    answers: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    ignore_range: bool = False
    validators: bool = True
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    base: str = ""

    def url(self, path: str) -> str:
        return self.base + path

    def record(self, req: Request) -> None:
        with self.lock:
            self.log.append(req)

    def requests_for(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.log if r.path == path]

    def body_gets(self, path: str) -> list[Request]:
        return [r for r in self.requests_for(path) if r.body_bytes > 0]


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:20] + '"'


def make_handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        # Each request is recorded before anything is sent, and its byte count grows before each
        # write, so a client that has seen a response always finds it in the log.
        req: Request

        def _simple(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.req.status = status
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            path = self.path
            self.req = Request("GET", path, 0, 0, dict(self.headers.items()))
            state.record(self.req)
            if path in state.stall:
                time.sleep(state.stall[path])
            if path in state.redirects:
                return self._simple(302, {"Location": state.redirects[path]})
            if path in state.status:
                return self._simple(state.status[path])
            with state.lock:
                answer = state.answers[path].pop(0) if state.answers.get(path) else None
            if answer is not None:
                return self._simple(*answer)
            body = state.files.get(path)
            if body is None:
                return self._simple(404)
            etag = etag_of(body)
            headers = {"ETag": etag, "Last-Modified": LAST_MODIFIED} if state.validators else {}
            if state.validators:
                inm = self.headers.get("If-None-Match")
                ims = self.headers.get("If-Modified-Since")
                if (inm is not None and inm == etag) or (inm is None and ims == LAST_MODIFIED):
                    return self._simple(304, headers)
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and not state.ignore_range and rng.startswith("bytes=") and rng.endswith("-"):
                if_range = self.headers.get("If-Range")
                if if_range is None or if_range in (etag, LAST_MODIFIED):
                    start, status = int(rng[6:-1]), 206
            payload = memoryview(body)[start:]
            self.req.status = status
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            limit = len(payload)
            with state.lock:
                drops = state.drop_after.get(path)
                if drops:
                    limit = min(limit, drops.pop(0))
            sent = 0
            try:
                while sent < limit:
                    n = min(256 * 1024, limit - sent)
                    self.req.body_bytes += n
                    self.wfile.write(payload[sent:sent + n])
                    sent += n
                self.wfile.flush()
            except OSError:
                pass
            if limit < len(payload):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return Handler


class Server:
    def __init__(self, state: ServerState, tls: tuple[Path, Path] | None = None) -> None:
        self.state = state
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(os.fspath(tls[0]), os.fspath(tls[1]))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.port = self.httpd.server_address[1]
        state.base = f"{scheme}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", os.fspath(key),
                    "-out", os.fspath(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def make_qcow2(directory: Path, name: str, mib: int, seed: int) -> bytes:
    """A small qcow2 image with pseudo-random content (half of it zeros); returns its bytes."""
    raw = directory / f"{name}.raw"
    rnd = random.Random(seed)
    with open(raw, "wb") as f:
        for i in range(mib):
            f.write(rnd.randbytes(1024 * 1024) if i % 2 == 0 else bytes(1024 * 1024))
    out = directory / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", os.fspath(raw), os.fspath(out)],
                   check=True)
    raw.unlink()
    return out.read_bytes()


def write_site(config_dir: Path, sections: dict[str, dict[str, str]] | None = None,
               *, cabundle: Path | None = None) -> Path:
    """A site configuration for tests: loopback allowed, fast retries and timeouts."""
    conf: dict[str, dict[str, str]] = {
        "Images": {"AllowPrivateURLs": "yes", "AllowPlainHTTP": "yes"},
        "HTTP": {"Retries": "2", "RetryBackoff": "0.05", "ConnectTimeout": "3", "ReadTimeout": "3"},
    }
    if cabundle is not None:
        conf["HTTP"]["CABundle"] = os.fspath(cabundle)
    for section, values in (sections or {}).items():
        conf.setdefault(section, {}).update(values)
    config_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(f"[{sec}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for sec, kv in conf.items())
    (config_dir / "defaults.conf").write_text(text)
    return config_dir
