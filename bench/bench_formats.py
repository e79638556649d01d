#!/usr/bin/env python3
"""Benchmark (not a test): our create against the FASTEST bare pipeline for each input kind.

Builds, once, a realistic cloud image (2 GiB virtual,
GPT, one ext4 partition holding a copy of /usr/bin and 6 x 20 MiB of random data) and derives
every input kind from it: raw, qcow2, zlib-compressed qcow2, streamOptimized vmdk, vhdx, and
raw wrapped in xz (multi-block, as distros publish), gzip, zstd, bzip2 and a GCE-style sparse
tar.gz.  Every candidate runs once and its result is checked with ``qemu-img compare``.  Then,
onto a fresh sparse 2 GiB file, after ``sync`` (the VM is noisy):

* a pilot of interleaved rounds of every bare pipeline candidate for that input (qemu-img
  convert with several flag sets; ``xz -T0 -dc``/``pigz -dc``/``zstd -dc``/``lbzip2 -dc`` into
  ``dd conv=sparse``), all durable, picks the fastest;
* timed rounds, input by input, in rotating order, of that fastest bare pipeline against
  ``create``: the whole create as Ganeti runs it: the OS script ``instance-cloudimage install``
  wrote, started with Ganeti's environment, which starts a new interpreter and imports the
  pipeline.

It prints, per input kind, medians, the ratio to the baseline (the median over rounds of our time
over the baseline's time in the same round), each round's ratio, bytes allocated on the target
against the image's non-zero data, and the peak RSS summed over each process tree.

    bench/bench_formats.py [--workdir /var/tmp/cloudimage-bench] [--rounds 9] [--pilot 3] [--kinds raw xz ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent.parent))

from instance_cloudimage.ganeti.simulate import SimulatedDisk, simulated_environment

GiB = 1024**3
MiB = 1024**2
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


def sh(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)


def q(p: Path | str) -> str:
    return shlex.quote(os.fspath(p))


# --- images ----------------------------------------------------------------------------------

def build_raw(work: Path) -> Path:
    raw = work / "cloud.raw"
    if raw.exists():
        return raw
    tree = work / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "data").mkdir(parents=True)
    sh(f"cp -a /usr/bin {q(tree / 'bin')}")
    for i in range(6):
        sh(f"head -c 20M /dev/urandom > {q(tree / 'data' / f'random{i}')}")
    tmp = work / "cloud.raw.tmp"
    sh(f"truncate -s 2G {q(tmp)} && sgdisk -o -n 1:2048:0 -t 1:8300 {q(tmp)} > /dev/null")  # -q skips the write
    sectors = 2 * GiB // 512 - 2048 - 33
    sh(f"mke2fs -q -F -t ext4 -L cloudimg-rootfs -d {q(tree)} -E offset={2048 * 512} {q(tmp)} {sectors // 2}k")
    shutil.rmtree(tree)
    tmp.rename(raw)
    return raw


def derive(work: Path, raw: Path) -> dict[str, Path]:
    recipes = {
        "raw": ("cloud.raw", None),
        "qcow2": ("cloud.qcow2", "qemu-img convert -f raw -O qcow2 {raw} {out}"),
        "qcow2-zlib": ("cloud-c.qcow2", "qemu-img convert -f raw -O qcow2 -c {raw} {out}"),
        "vmdk-stream": ("cloud-so.vmdk", "qemu-img convert -f raw -O vmdk -o subformat=streamOptimized {raw} {out}"),
        "vhdx": ("cloud.vhdx", "qemu-img convert -f raw -O vhdx {raw} {out}"),
        "xz": ("cloud.raw.xz", "xz -T0 -6 -c {raw} > {out}"),
        "gzip": ("cloud.raw.gz", "pigz -6 -c {raw} > {out}"),
        "zstd": ("cloud.raw.zst", "zstd -q -T0 -3 -c {raw} > {out}"),
        "bzip2": ("cloud.raw.bz2", "lbzip2 -9 -c {raw} > {out}"),
        "tar.gz": ("gce.tar.gz", "tar -C {dir} --format=oldgnu -S -cf - disk.raw | pigz -6 > {out}"),
    }
    images = {}
    for kind, (name, recipe) in recipes.items():
        out = work / name
        if recipe and not out.exists():
            if kind == "tar.gz":
                d = work / "gce"
                d.mkdir(exist_ok=True)
                sh(f"cp --sparse=always {q(raw)} {q(d / 'disk.raw')}")
            print(f"building {name} ...", flush=True)
            sh(recipe.format(raw=q(raw), out=q(str(out) + ".tmp"), dir=q(work / "gce")))
            os.rename(str(out) + ".tmp", out)
            shutil.rmtree(work / "gce", ignore_errors=True)
        images[kind] = out
    return images


def nonzero_data(work: Path, raw: Path) -> int:
    cache = work / "nonzero.json"
    if cache.exists():
        return int(json.loads(cache.read_text())["bytes"])
    total, zero = 0, bytes(4096)
    with open(raw, "rb") as f:
        while block := f.read(4 * MiB):
            for i in range(0, len(block), 4096):
                if block[i:i + 4096] != zero:
                    total += 4096
    cache.write_text(json.dumps({"bytes": total}))
    return total


# --- candidates ------------------------------------------------------------------------------

QEMU_FLAGS = {
    "qemu-img -t none -W": "-t none -W",
    "qemu-img -t none -W -m 16": "-t none -W -m 16",
    "qemu-img -t writeback -W": "-t writeback -W",
    "qemu-img -t none -W -m 16 --target-is-zero": "-t none -W -m 16 --target-is-zero",
}
QEMU_FORMAT = {"raw": "raw", "qcow2": "qcow2", "qcow2-zlib": "qcow2", "vmdk-stream": "vmdk", "vhdx": "vhdx"}
DECODER = {"xz": "xz -T0 -dc", "gzip": "pigz -dc", "zstd": "zstd -dc", "bzip2": "lbzip2 -dc",
           "tar.gz": "pigz -dc {img} | tar -xOf - disk.raw"}
DD = "dd of={tgt} bs=4M iflag=fullblock conv=sparse,notrunc,fdatasync status=none"


def baselines(kind: str, image: Path) -> dict[str, str]:
    if kind in QEMU_FORMAT:
        fmt = QEMU_FORMAT[kind]
        return {name: f"qemu-img convert -n -f {fmt} -O raw {flags} {q(image)} {{tgt}}"
                for name, flags in QEMU_FLAGS.items()}
    decoder = DECODER[kind]
    cmd = decoder.format(img=q(image)) if "{img}" in decoder else f"{decoder} {q(image)}"
    return {f"{decoder.split()[0]} | dd conv=sparse": f"{cmd} | {DD}"}


def ours(work: Path) -> dict[str, list[str]]:
    # The OS script as Ganeti runs it: installed, started with Ganeti's environment (run_one).
    return {"create": [os.fspath(work / "os" / "create")]}


def ganeti_env(image: Path, target: Path) -> dict[str, str]:
    """What Ganeti gives a create script, for the plain variant."""
    return simulated_environment("plain", [SimulatedDisk(target, size_mib=2 * GiB // MiB)],
                                 instance_name="bench.example.org", params={"image": os.fspath(image)})


def write_site(work: Path) -> None:
    etc = work / "etc"
    (etc / "variants").mkdir(parents=True, exist_ok=True)
    (etc / "defaults.conf").write_text(f"[Images]\nAllowedDirectories = {work}\n")
    (etc / "variants" / "plain.conf").write_text(
        "[Variant]\nDescription = plain disk\nAgent = none\nSeed = none\nArchitectures = x86_64 aarch64\n"
        "[Image]\nURL = builtin:demo\n")
    sh(f"{q(VENV_BIN / 'instance-cloudimage')} install --os-dir {q(work / 'os')} "
       f"--config-dir {q(etc)} --cache-dir {q(work / 'cache')} 2>/dev/null")


# --- measuring -------------------------------------------------------------------------------

def tree_rss(pid: int) -> int:
    """Sum of VmRSS over ``pid`` and all its descendants, in bytes."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run_one(cmd: str | list[str], target: Path, image: Path) -> tuple[float, int, int]:
    """Run onto a fresh sparse 2 GiB target; return (seconds, peak tree RSS, bytes allocated)."""
    target.unlink(missing_ok=True)
    with open(target, "wb") as f:
        f.truncate(2 * GiB)
    # The previous run's freed extents and journal commit would otherwise land in this run's time.
    os.sync()
    if isinstance(cmd, str):
        argv = ["bash", "-o", "pipefail", "-c", cmd.replace("{tgt}", q(target))]
    else:
        argv = [a.replace("{tgt}", os.fspath(target)) for a in cmd]
    peak = 0
    start = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as installed: .pyc cached
    if argv[0].endswith("/create"):
        env = ganeti_env(image, target)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    elapsed = time.monotonic() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {argv}\n{err.decode()[-2000:]}")
    allocated = os.stat(target).st_blocks * 512
    return elapsed, peak, allocated


def check_same(target: Path, raw: Path) -> None:
    sh(f"qemu-img compare -q -f raw -F raw {q(target)} {q(raw)}")


def bench(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    raw = build_raw(work)
    images = derive(work, raw)
    data = nonzero_data(work, raw)
    write_site(work)
    target = work / "target.raw"
    kinds = args.kinds or list(images)
    sh(f"PYTHONDONTWRITEBYTECODE= {q(sys.executable)} -m compileall -q {q(HERE.parent / 'instance_cloudimage')}")
    for path in images.values():  # warm the page cache, as right after a download
        sh(f"cat {q(path)} > /dev/null")
    bare = {k: baselines(k, images[k]) for k in kinds}
    for kind in kinds:  # every candidate once, checked for correctness; not timed
        checked: list[str | list[str]] = [*bare[kind].values(), *ours(work).values()]
        for cmd in checked:
            run_one(cmd, target, images[kind])
            check_same(target, raw)
    best = pick_baselines(args, kinds, bare, images, target)
    plan: dict[str, dict[str, str | list[str]]] = {k: {best[k]: bare[k][best[k]], **ours(work)} for k in kinds}
    times, rss, alloc = measure(args.rounds, kinds, plan, images, target)
    report(kinds, best, images, times, rss, alloc, data)


Times = dict[tuple[str, str], list[float]]


def measure(rounds: int, kinds: list[str], plan: dict[str, dict[str, str | list[str]]], images: dict[str, Path],
            target: Path) -> tuple[Times, dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    times: Times = {}
    rss: dict[tuple[str, str], int] = {}
    alloc: dict[tuple[str, str], int] = {}
    # One input at a time, short ones first: a round of the long decodes writes gigabytes, and the
    # VM's disk then stalls now and then for seconds, which would land at random in the short runs.
    for kind in kinds:
        for rnd in range(rounds):
            names = list(plan[kind])
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:  # rotate the order to cancel drift
                t, r, a = run_one(plan[kind][name], target, images[kind])
                times.setdefault((kind, name), []).append(t)
                rss[(kind, name)] = max(rss.get((kind, name), 0), r)
                alloc[(kind, name)] = a
        print(f"{kind}: {rounds} rounds done", file=sys.stderr, flush=True)
    return times, rss, alloc


def pick_baselines(args: argparse.Namespace, kinds: list[str], bare: dict[str, dict[str, str]],
                   images: dict[str, Path], target: Path) -> dict[str, str]:
    """The fastest bare candidate per input, from rounds of their own.

    Picking it from the same runs it is then compared with would favour it: of several flag
    sets that are equally fast, the one that drew the luckiest runs would win and set the bar
    (the winner's curse).  So a pilot picks it, and the timed rounds measure it afresh."""
    several = [k for k in kinds if len(bare[k]) > 1]
    if not several:
        return {k: next(iter(bare[k])) for k in kinds}
    print(f"pilot: {args.pilot} rounds of the bare candidates", file=sys.stderr, flush=True)
    times, _, _ = measure(args.pilot, several, {k: dict(bare[k]) for k in several}, images, target)
    best = {k: next(iter(bare[k])) for k in kinds}
    for kind in several:
        med = {n: statistics.median(times[(kind, n)]) for n in bare[kind]}
        best[kind] = min(med, key=lambda n: med[n])
        print(f"  {kind}: " + ", ".join(f"{n} {t:.2f}" for n, t in med.items()), file=sys.stderr)
    return best


def paired_ratios(times: Times, kind: str, ours_name: str, base: str) -> list[float]:
    """Per round, ours over the baseline run next to it: drift between rounds cancels out."""
    return sorted(o / b for o, b in zip(times[(kind, ours_name)], times[(kind, base)], strict=True))


def report(kinds: list[str], best: dict[str, str], images: dict[str, Path], times: Times,
           rss: dict[tuple[str, str], int], alloc: dict[tuple[str, str], int], data: int) -> None:
    rounds = len(next(iter(times.values())))
    print(f"\nimage: 2 GiB virtual, {data / MiB:.0f} MiB of non-zero data (4 KiB blocks); {rounds} rounds "
          "per input; target: fresh sparse file;\nratio: median over rounds of ours / the baseline's run in that "
          "round\n")
    print("| input | fastest bare pipeline | bare s | create s | ratio "
          "| written MiB (create / bare) | peak RSS MiB (bare / create) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    spread = []
    for kind in kinds:
        base = best[kind]
        ratios = paired_ratios(times, kind, "create", base)
        spread.append(f"  {kind}: " + " ".join(f"{r:.2f}" for r in ratios))
        print(f"| {kind} ({images[kind].stat().st_size / MiB:.0f} MiB) | `{base}` "
              f"| {statistics.median(times[(kind, base)]):.2f} | {statistics.median(times[(kind, 'create')]):.2f} "
              f"| {statistics.median(ratios):.2f} "
              f"| {alloc[(kind, 'create')] / MiB:.0f} / {alloc[(kind, base)] / MiB:.0f} "
              f"| {rss[(kind, base)] / MiB:.0f} / {rss[(kind, 'create')] / MiB:.0f} |")
    print("\nper-round ratios, sorted:")
    print("\n".join(spread))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/var/tmp/cloudimage-bench")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of the chosen baselines and ours")
    parser.add_argument("--pilot", type=int, default=3, help="rounds of the bare candidates that pick the baselines")
    parser.add_argument("--kinds", nargs="*")
    bench(parser.parse_args())


if __name__ == "__main__":
    main()
