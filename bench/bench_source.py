#!/usr/bin/env python3
"""Benchmark: a create from a fresh (uncached) URL against `curl -o file && qemu-img convert`.

Both fetch the same qcow2 image from the same loopback HTTP server (tests/httpfixtures.py) and
write it onto a raw disk file; the runs alternate, and the median of each is compared.  This is
not a test: it prints times and the ratio (create / baseline; below 1.0 means create is faster).

    .venv/bin/python bench/bench_source.py [--mib 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT / "tests"))

from httpfixtures import Server, ServerState, make_qcow2, write_site  # noqa: E402

CLI = Path(sys.executable).parent / "instance-cloudimage"


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="virtual size of the test image (half random data)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-source-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        image = make_qcow2(tmp, "img", args.mib, seed=7)
        state = ServerState(files={"/img.qcow2": image})
        server = Server(state)
        cfg = write_site(tmp / "etc")
        url = state.url("/img.qcow2")
        (cfg / "variants").mkdir()
        (cfg / "variants" / "bench.conf").write_text(f"[Image]\nURL = {url}\n")
        disk_size = f"{args.mib + 16}M"
        ours, base, durable, fetch_only, curl_only = [], [], [], [], []
        try:
            for run in range(args.runs):
                cache = tmp / f"cache{run}"
                disk = tmp / "ours.img"
                disk.unlink(missing_ok=True)
                ours.append(timed([os.fspath(CLI), "create", "--disk", os.fspath(disk), "--disk-size", disk_size,
                                   "--config-dir", os.fspath(cfg), "--cache-dir", os.fspath(cache),
                                   "-O", f"image={url}"]))
                shutil.rmtree(cache)
                dl, out = tmp / "dl.qcow2", tmp / "base.img"
                dl.unlink(missing_ok=True)
                out.unlink(missing_ok=True)
                start = time.monotonic()
                subprocess.run(["curl", "-sSf", "-o", os.fspath(dl), url], check=True)
                subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                                os.fspath(dl), os.fspath(out)], check=True)
                base.append(time.monotonic() - start)
                subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                                os.fspath(disk), os.fspath(out)], check=True)
                # The same baseline made durable like create's write (qemu-img -t writeback flushes).
                dl.unlink()
                out.unlink()
                start = time.monotonic()
                subprocess.run(["curl", "-sSf", "-o", os.fspath(dl), url], check=True)
                subprocess.run(["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "raw",
                                os.fspath(dl), os.fspath(out)], check=True)
                durable.append(time.monotonic() - start)
                # The source's share alone (a separate process, like curl): download + hash + cache commit.
                fetch_only.append(timed([os.fspath(CLI), "cache", "fetch", "bench", "--config-dir", os.fspath(cfg),
                                         "--cache-dir", os.fspath(tmp / f"fcache{run}")]))
                shutil.rmtree(tmp / f"fcache{run}")
                dl.unlink()
                start = time.monotonic()
                subprocess.run(["curl", "-sSf", "-o", os.fspath(dl), url], check=True)
                curl_only.append(time.monotonic() - start)
        finally:
            server.stop()
        def fmt(times: list[float]) -> str:
            return " ".join(f"{t:.2f}" for t in times)

        m_ours, m_base, m_durable = statistics.median(ours), statistics.median(base), statistics.median(durable)
        print(f"image: {len(image) / 2**20:.0f} MiB qcow2, {args.mib} MiB virtual, {args.runs} runs each")
        print(f"instance-cloudimage create (fresh cache): median {m_ours:.2f}s  runs {fmt(ours)}")
        print(f"curl -o file && qemu-img convert:        median {m_base:.2f}s  runs {fmt(base)}")
        print(f"same, durable (qemu-img -t writeback): median {m_durable:.2f}s  runs {fmt(durable)}")
        m_fetch, m_curl = statistics.median(fetch_only), statistics.median(curl_only)
        print(f"cache fetch (download, hash, cache):    median {m_fetch:.2f}s  runs {fmt(fetch_only)}")
        print(f"curl -o file only:                      median {m_curl:.2f}s  runs {fmt(curl_only)}")
        print(f"ratio fetch/curl: {m_fetch / m_curl:.2f}")
        print(f"ratio create/baseline: {m_ours / m_base:.2f}  (create/durable baseline: {m_ours / m_durable:.2f})")


if __name__ == "__main__":
    main()
