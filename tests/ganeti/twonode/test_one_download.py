"""One download per cluster (docs/images.md): the master fetches a variant's image once, exports the
cache entry to one file, gnt-cluster copyfile gives it to every node, and each node's cache
import verifies it; creates on both nodes then transfer no image bytes.  The image is served by
a real HTTP server on the cluster's network (in node1's network namespace), which logs each
request."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twonode_cluster import COMMAND, CONFIG_DIR, NODE_IP, Installed, TwoNodes, fqdn

from instance_cloudimage.sources.demo import build_demo_image

PORT = 8080
VARIANT = "demo-http"


@pytest.fixture
def image_server(two_nodes: TwoNodes, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """(URL, sha256, request log) of the demo image served over HTTP from node1's address."""
    www = tmp_path / "www"
    www.mkdir()
    image = www / "demo.qcow2"
    shutil.copy(build_demo_image("demo", tmp_path / "cache"), image)
    sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
    log = tmp_path / "requests.log"
    # nsenter without -p execs: the Popen's process is the server itself (the host's /tmp path).
    with open(log, "wb") as out:
        server = subprocess.Popen(
            ["nsenter", f"--net=/proc/{two_nodes.node_pid('node1')}/ns/net", "--", "/usr/bin/python3", "-m",
             "http.server", "--bind", NODE_IP["node1"], "--directory", os.fspath(www), str(PORT)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://{NODE_IP['node1']}:{PORT}/demo.qcow2"
        deadline = time.monotonic() + 10
        while two_nodes.on("node2", "curl", "-sfI", "-o", "/dev/null", url, check=False).returncode != 0:
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.2)
        yield url, sha256, log
    finally:
        server.terminate()
        server.wait(10)


def requests(log: Path) -> list[str]:
    """The server's request lines (``ADDRESS - - [TIME] "METHOD PATH HTTP/1.1" STATUS -``)."""
    return [line for line in log.read_text().splitlines() if re.search(r'\] "[A-Z]+ /', line)]


def test_one_download_per_cluster(installed: Installed, two_nodes: TwoNodes,
                                  image_server: tuple[str, str, Path]) -> None:
    nodes = two_nodes
    url, sha256, log = image_server
    # A site variant on the master, given to every node with the rest of the site configuration.
    config = nodes.host_path("node1", CONFIG_DIR)
    (config / "variants" / f"{VARIANT}.conf").parent.mkdir(exist_ok=True)
    (config / "variants" / f"{VARIANT}.conf").write_text(
        "[Variant]\nDescription = The demo image from the site's server\nAgent = cloud-init\n"
        f"Architectures = x86_64\n[Image]\nURL = {url}\nChecksum = sha256:{sha256}\nFormat = qcow2\n")
    with open(config / "variants.list", "a") as f:
        f.write(f"{VARIANT}\n")
    nodes.distribute_site_config()
    verify = nodes.verify()
    assert verify.returncode == 0, verify.describe()
    before = requests(log)  # the fixture's HEAD, to see that the server answers

    # docs/images.md, "One download per cluster", on the master:
    fetched = nodes.gnt(COMMAND, "cache", "fetch", VARIANT).stdout
    assert f"sha256:{sha256}" in fetched, fetched
    entry = f"/root/{VARIANT}.cie"
    nodes.gnt(COMMAND, "cache", "export", f"sha256:{sha256}", entry)
    nodes.gnt("gnt-cluster", "copyfile", entry)
    imported = nodes.gnt("gnt-cluster", "command", f"{COMMAND} cache import {entry}").output
    nodes.gnt("gnt-cluster", "command", f"rm -f {entry}")
    assert imported.count("return code = 0") == 2, imported
    assert not nodes.host_path("node2", entry).exists()
    # node2's cache has its own copy of the image, verified on import.
    listed = nodes.on("node2", COMMAND, "cache", "list").stdout
    assert sha256[:12] in listed, listed

    nodes.add_instance("one1", "node1", VARIANT)
    nodes.add_instance("one2", "node2", VARIANT)
    # One GET in all, the master's fetch; the creates on both nodes made no request at all.
    made = requests(log)[len(before):]
    assert len(made) == 1 and made[0].startswith(NODE_IP["node1"] + " ") and '"GET /demo.qcow2 ' in made[0], made
    for name, node in (("one1", "node1"), ("one2", "node2")):
        created = nodes.os_log(node, "add", name)
        assert f"installing {fqdn(name)} (variant {VARIANT}" in created, created
        assert "using the cached image (verified sha256)" in created and "downloading" not in created, created
