#!/usr/bin/env python3
"""Benchmark (not a test): how long ``create`` takes from its process start to qemu-img convert,
or to the decoder of a compressed image (xz, pigz, lbzip2): the fixed cost of a cold script run.

Runs ``instance-cloudimage create`` of a local image (the site and images bench_formats.py
builds in its work directory) under ``strace -f --seccomp-bpf -e trace=execve`` and reads, from
the execve timestamps, the time from our own exec to the exec of ``qemu-img convert`` (the
actual binary, after prlimit) and to the first child of any kind.  strace stops the tracee only
at execve (seccomp-bpf), so it adds little; the whole run's wall time is printed too, to show
that what moved out of the way is not simply paid for later.  Then ``-X importtime``, as medians
of the same number of runs: of the same command, the imports seen before the log line that
announces qemu-img; and of ``import instance_cloudimage.cli.main, instance_cloudimage.verbs.create``.

``--script`` runs the Ganeti OS script (installed into the work directory by ``instance-cloudimage
install``) with a Ganeti environment instead of the console command, i.e. Ganeti's own path
(but without ``-I``, so that ``--compare`` can set PYTHONPATH).  ``--compare DIR`` measures, in
alternating runs, the package in DIR too (e.g. an older commit's ``git archive main
instance_cloudimage | tar -x -C DIR``), put first on the PYTHONPATH.

    bench/bench_startup.py [--workdir /var/tmp/cloudimage-bench] [--runs 15] [--kind raw|qcow2|vhdx]
                           [--script] [--compare DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))

from instance_cloudimage.ganeti.simulate import SimulatedDisk, simulated_environment

GiB = 1024**3
VENV_BIN = Path(sys.executable).parent
IMAGES = {"raw": "cloud.raw", "qcow2": "cloud.qcow2", "vhdx": "cloud.vhdx", "xz": "cloud.raw.xz",
          "gzip": "cloud.raw.gz", "bzip2": "cloud.raw.bz2"}
# The first exec that starts the work: qemu-img convert, or the decoder of a compressed image.
DECODERS = ("/xz", "/pigz", "/lbzip2")
EXECVE = re.compile(r'^(\d+) +(\d+\.\d+) execve\("([^"]*)", \[(.*)')
IMPORT = re.compile(r"^import time: +(\d+) \| +(\d+) \| (.*)$")


def create_argv(work: Path, image: Path, target: Path) -> list[str]:
    return [os.fspath(VENV_BIN / "instance-cloudimage"), "create", "--disk", os.fspath(target),
            "--variant", "plain", "--config-dir", os.fspath(work / "etc"), "--cache-dir", os.fspath(work / "cache"),
            "-O", f"image={image}"]


def script_argv(work: Path, image: Path, target: Path) -> tuple[list[str], dict[str, str]]:
    """The installed create script, and the environment Ganeti would give it."""
    os_dir = work / "os-startup"
    subprocess.run([os.fspath(VENV_BIN / "instance-cloudimage"), "install", "--os-dir", os.fspath(os_dir),
                    "--config-dir", os.fspath(work / "etc"), "--cache-dir", os.fspath(work / "cache")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = simulated_environment("plain", [SimulatedDisk(target, size_mib=2 * GiB // 1024**2)],
                                instance_name="demo.example.org", instance_uuid="9a5d5fbc-5b6b-5b8e-8d36-1c1b9f8a4f4b",
                                params={"image": os.fspath(image)})
    return [os.fspath(os_dir / "create")], env


def fresh_target(target: Path) -> None:
    target.unlink(missing_ok=True)
    with open(target, "wb") as f:
        f.truncate(2 * GiB)


# What the measured command runs with; --script replaces it with a Ganeti environment.
BASE_ENV = dict(os.environ)


def environment(tree: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in BASE_ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as installed: .pyc cached
    if tree is not None:
        env["PYTHONPATH"] = os.fspath(tree)
    return env


def timeline(argv: list[str], tree: Path | None) -> tuple[float, float, float]:
    """(ms to the first child's exec, ms to qemu-img convert's or the decoder's exec, s of the whole run)."""
    with tempfile.NamedTemporaryFile("r", prefix="strace-", suffix=".txt") as log:
        start = time.monotonic()
        subprocess.run(["strace", "-f", "--seccomp-bpf", "-ttt", "-qq", "-e", "trace=execve", "-e", "signal=none",
                        "-o", log.name, sys.executable, *argv],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(tree))
        wall = time.monotonic() - start
        execs = [m for line in log if (m := EXECVE.match(line))]
    root_pid, t0 = execs[0].group(1), float(execs[0].group(2))
    child = next(float(m.group(2)) for m in execs if m.group(1) != root_pid)
    convert = next(float(m.group(2)) for m in execs
                   if (m.group(3).endswith("/qemu-img") and '"convert"' in m.group(4))
                   or m.group(3).endswith(DECODERS))
    return (child - t0) * 1000, (convert - t0) * 1000, wall


def imports_before_convert(argv: list[str], tree: Path | None, mark: str) -> tuple[int, float]:
    """(modules, ms of import time, summed self times) until create logs ``mark``."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], check=True, capture_output=True, text=True,
                          env=environment(tree))
    count, total = 0, 0
    for line in proc.stderr.splitlines():
        if mark in line:
            break
        if m := IMPORT.match(line):
            count += 1
            total += int(m.group(1))
    return count, total / 1000


def imports_of_modules(tree: Path | None) -> float:
    """ms, cumulative, of importing cli and then create in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c",
                           "import instance_cloudimage.cli.main, instance_cloudimage.verbs.create"],
                          check=True, capture_output=True, text=True, env=environment(tree), cwd="/")
    total = 0
    for line in proc.stderr.splitlines():
        m = IMPORT.match(line)
        if m and m.group(3) in ("instance_cloudimage.cli.main", "instance_cloudimage.verbs.create"):
            total += int(m.group(2))
    return total / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/var/tmp/cloudimage-bench")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--kind", choices=sorted(IMAGES), default="raw")
    parser.add_argument("--script", action="store_true", help="run the Ganeti OS script, not the console command")
    parser.add_argument("--compare", type=Path, help="a directory holding another instance_cloudimage package")
    args = parser.parse_args()
    work = Path(args.workdir)
    image = work / IMAGES[args.kind]
    if not (image.exists() and (work / "etc").is_dir()):
        raise SystemExit(f"{image} or {work / 'etc'} is missing: run bench/bench_formats.py --rounds 1 first")
    trees: dict[str, Path | None] = {"this checkout": None}
    if args.compare:
        trees[os.fspath(args.compare)] = args.compare.resolve()
    target = work / "target-startup.raw"
    # The log line after which the work has started: qemu-img's, or (its decoder runs by then)
    # the one naming what a compressed image holds.
    mark = "image content:" if IMAGES[args.kind].endswith((".xz", ".gz", ".bz2")) else "with qemu-img"
    if args.script:
        argv, ganeti_env = script_argv(work, image, target)
        BASE_ENV.clear()
        BASE_ENV.update(ganeti_env)
    else:
        argv = create_argv(work, image, target)
    for tree in trees.values():
        package = (tree or Path(__file__).resolve().parents[1]) / "instance_cloudimage"
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.fspath(package)], check=True, env=environment())
        used = subprocess.run([sys.executable, "-c", "import instance_cloudimage; print(instance_cloudimage.__file__)"],
                              check=True, capture_output=True, text=True, env=environment(tree), cwd="/").stdout
        if Path(used.strip()).parent != package:
            raise SystemExit(f"{package} is not the package imported with this PYTHONPATH: {used.strip()}")
    subprocess.run(["cat", os.fspath(image)], check=True, stdout=subprocess.DEVNULL)  # warm the page cache
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    counts: dict[str, list[tuple[int, float]]] = {name: [] for name in trees}
    modules: dict[str, list[float]] = {name: [] for name in trees}
    try:
        for tree in trees.values():  # warm-up, not counted
            fresh_target(target)
            timeline(argv, tree)
        for _ in range(args.runs):  # alternating, so that the machine's noise hits both alike
            for name, tree in trees.items():
                fresh_target(target)
                samples[name].append(timeline(argv, tree))
        for _ in range(args.runs):
            for name, tree in trees.items():
                fresh_target(target)
                counts[name].append(imports_before_convert(argv, tree, mark))
                modules[name].append(imports_of_modules(tree))
    finally:
        target.unlink(missing_ok=True)
    for name in trees:
        child, convert, wall = (statistics.median(s[i] for s in samples[name]) for i in range(3))
        spread = sorted(s[1] for s in samples[name])
        count, imported = (statistics.median(c[i] for c in counts[name]) for i in range(2))
        print(f"{name}, {args.kind}, medians of {args.runs} runs:\n"
              f"  under strace: first child exec {child:.1f} ms, qemu-img convert or decoder exec {convert:.1f} ms "
              f"(min {spread[0]:.1f}, max {spread[-1]:.1f}), whole create {wall:.3f} s\n"
              f"  -X importtime: {count:.0f} modules imported before '{mark}', {imported:.1f} ms (self times "
              f"summed); import of cli + create {statistics.median(modules[name]):.1f} ms (cumulative)")


if __name__ == "__main__":
    main()
