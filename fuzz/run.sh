#!/bin/sh
# Fuzz each parser for a bounded time with atheris (not run by CI).
#
#   fuzz/run.sh [TARGET...]          every target when none is named
#   FUZZ_SECONDS=60                  time per target
#   PYTHON=.venv/bin/python          an interpreter with atheris and the package installed
#
# Seeds are written into fuzz/corpus/<target>/ first; what the fuzzer adds stays there for the
# next run.  Findings land in fuzz/artifacts/<target>/ (crash-*, timeout-*); replay one with
# "$PYTHON fuzz/fuzz.py TARGET fuzz/artifacts/TARGET/crash-...".
set -eu

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
TARGETS=${*:-detect qcow2 vmdk vhd vhdx vdi tar exportstream userdata sshkeys}

"$PYTHON" fuzz/seeds.py fuzz/corpus
status=0
for target in $TARGETS; do
    mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
    log="fuzz/artifacts/$target/fuzz.log"
    echo "== $target: ${FUZZ_SECONDS}s"
    if "$PYTHON" fuzz/fuzz.py "$target" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
            -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" "fuzz/corpus/$target" >"$log" 2>&1; then
        grep -E '^stat::number_of_executed_units|^#[0-9]+ +DONE' "$log" | tail -2
    else
        status=1
        echo "$target: FINDING, see $log"
        grep -E '^(==[0-9]+== ERROR|=== Uncaught|[A-Za-z]*Error)' "$log" | head -5
    fi
done
exit $status
