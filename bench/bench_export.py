#!/usr/bin/env python3
"""Benchmark: what an export of a mostly empty disk puts on the wire (not a test).

Builds a sparse disk (default 10 GiB) holding some data (default 1 GiB, in islands, half of it
random and half compressible text), then measures, side by side in the same run:

- ``dd``: the plain ``dd bs=1M`` export other providers do (the baseline);
- ``compact``: our export script with the default site config;
- ``compact+zstd``: our export script with ``[Export] Compression = zstd``.

Each stream is piped into a byte counter, as Ganeti's socat would take it.  Prints bytes on the
wire, the ratio to the data held and to dd, and the time.  ``--verify`` also imports each of our
streams and compares the result with the disk.

    .venv/bin/python bench/bench_export.py [--size 10G] [--data 1G] [--dir /var/tmp] [--verify]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))

from instance_cloudimage.cli.install import install_os
from instance_cloudimage.ganeti.env import Script
from instance_cloudimage.ganeti.simulate import SimulatedTransfer, simulated_environment
from instance_cloudimage.runtime.settings import parse_size
from instance_cloudimage.runtime.siteconfig import Paths

MIB = 1024 * 1024
ISLAND = 16 * MIB


def build_disk(path: Path, size: int, data: int) -> None:
    """``data`` bytes in 16 MiB islands spread evenly over a sparse ``size``-byte file."""
    islands = max(1, data // ISLAND)
    stride = size // islands
    text = (b"The quick brown fox jumps over the lazy dog. " * 400000)[:ISLAND]
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(islands):
            f.seek(i * stride)
            f.write(os.urandom(ISLAND) if i % 2 == 0 else text)


def count_stream(argv: list[str], env: dict[str, str] | None, cwd: str | None) -> tuple[int, float, str]:
    """Run ``argv``, count its stdout; return (bytes, seconds, sha256 of the stream)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, cwd=cwd)
    assert proc.stdout is not None
    total = 0
    digest = hashlib.sha256()
    buf = bytearray(MIB)
    while n := proc.stdout.readinto(buf):
        total += n
        digest.update(memoryview(buf)[:n])
    if proc.wait() != 0:
        raise SystemExit(f"{argv[0]} failed with exit code {proc.returncode}")
    return total, time.monotonic() - start, digest.hexdigest()


def script_env(os_dir: Path, disk: Path, verb: Script) -> dict[str, str]:
    """What Ganeti's import-export daemon gives ``verb`` (export or import) for ``disk``."""
    return simulated_environment("demo", [disk], instance_name="bench.example", transfer=SimulatedTransfer(verb))


def verify(os_dir: Path, stream_argv: list[str], env: dict[str, str], disk: Path, work: Path) -> bool:
    target = work / "target"
    with open(target, "wb") as f:
        f.truncate(disk.stat().st_size)
    exporter = subprocess.Popen(stream_argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                cwd=os_dir)
    importer = subprocess.run([os_dir / "import"], stdin=exporter.stdout, env=script_env(os_dir, target, Script.IMPORT),
                              cwd=os_dir, stderr=subprocess.DEVNULL, check=False)
    exporter.wait()
    same = importer.returncode == 0 and subprocess.run(["cmp", "-s", disk, target], check=False).returncode == 0
    target.unlink()
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="10G", help="disk size (default: %(default)s)")
    ap.add_argument("--data", default="1G", help="data held by the disk (default: %(default)s)")
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse disk is made (default: %(default)s)")
    ap.add_argument("--verify", action="store_true", help="import our streams and compare with the disk")
    args = ap.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-export-") as tmp:
        work = Path(tmp)
        disk = work / "disk0"
        print(f"building a {args.size} sparse disk holding {args.data} ...", flush=True)
        build_disk(disk, size, data)
        held = os.stat(disk).st_blocks * 512
        os_dirs = {}
        for name, conf in (("compact", ""), ("compact+zstd", "[Export]\nCompression = zstd\n")):
            etc = work / name / "etc"
            etc.mkdir(parents=True)
            (etc / "defaults.conf").write_text(conf)
            os_dirs[name] = work / name / "os" / "cloudimage"
            install_os(os_dirs[name], Paths(etc, work / name / "cache"))

        runs: list[tuple[str, int, float]] = []
        nbytes, secs, _ = count_stream(["dd", f"if={disk}", "bs=1M", "status=none"], None, None)
        runs.append(("dd bs=1M", nbytes, secs))
        for name, os_dir in os_dirs.items():
            env = script_env(os_dir, disk, Script.EXPORT)
            nbytes, secs, _ = count_stream([os.fspath(os_dir / "export")], env, os.fspath(os_dir))
            runs.append((name, nbytes, secs))
            if args.verify:
                ok = verify(os_dir, [os.fspath(os_dir / "export")], env, disk, work)
                print(f"{name}: import of the stream {'equals' if ok else 'DIFFERS FROM'} the disk")

        dd_bytes, dd_secs = runs[0][1], runs[0][2]
        print(f"\ndisk {size / 2**30:.1f} GiB, data held {held / 2**30:.2f} GiB\n")
        print(f"{'method':14} {'bytes on the wire':>18} {'wire/data':>10} {'wire vs dd':>11} {'seconds':>8} "
              f"{'time vs dd':>11}")
        for name, nbytes, secs in runs:
            print(f"{name:14} {nbytes:18,d} {nbytes / held:10.3f} {nbytes / dd_bytes:11.4f} {secs:8.2f} "
                  f"{secs / dd_secs:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
