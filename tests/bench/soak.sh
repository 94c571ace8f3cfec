#!/bin/bash
# Soak: many `shoji run -- true` back to back, then many at once, from the VM template; counts
# failures and what is left on the host (fds of this shell's processes, mounts, sandbox
# directories, sockets, processes) before and after. Not in CI: it runs for a long time on a
# PVM host (each sandbox costs seconds of guest work there).
#
#   tests/bench/soak.sh [SERIAL [PARALLEL]]      defaults: 500 and 20
#
# Uses the `shoji` binary next to this script's checkout (target/release, else target/debug)
# or $SHOJI. The first run builds the template if there is none. Prints one summary line per
# phase and a before/after table; exits non-zero on any failure or leftover.
set -u
serial=${1:-500}
parallel=${2:-20}
root=$(cd "$(dirname "$0")/../.." && pwd)
shoji=${SHOJI:-}
for b in "$root/target/release/shoji" "$root/target/debug/shoji"; do
    [ -z "$shoji" ] && [ -x "$b" ] && shoji=$b
done
[ -x "$shoji" ] || { echo "soak: no shoji binary (cargo build --release)"; exit 2; }

# What a sandbox could leave behind.
count() {
    local run_dirs mounts socks procs
    run_dirs=$(find "${XDG_RUNTIME_DIR:-/run/user/$(id -u)}" /run/shoji /tmp -maxdepth 2 -name 'shoji-*' 2>/dev/null | wc -l)
    mounts=$(grep -c shoji /proc/self/mountinfo)
    socks=$(ss -xa 2>/dev/null | grep -c shoji)
    procs=$(pgrep -c -f "$shoji run" || true)
    echo "dirs=$run_dirs mounts=$mounts sockets=$socks processes=$procs"
}

before=$(count)
"$shoji" run -- true >/dev/null 2>&1 || { echo "soak: the warm-up run failed"; exit 1; }

fail=0
t0=$(date +%s.%N)
times=()
for i in $(seq 1 "$serial"); do
    s=$(date +%s.%N)
    if ! "$shoji" run -- true >/dev/null 2>/tmp/soak-err.$$; then
        fail=$((fail + 1))
        echo "soak: serial run $i failed: $(head -c 300 /tmp/soak-err.$$)"
    fi
    times+=("$(echo "$(date +%s.%N) - $s" | bc)")
done
t1=$(date +%s.%N)
p50=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "serial: $serial runs, $fail failed, $(echo "$t1 - $t0" | bc) s, p50 ${p50} s"

pfail=0
t0=$(date +%s.%N)
pids=()
for i in $(seq 1 "$parallel"); do
    "$shoji" run -- true >/dev/null 2>/tmp/soak-perr.$$.$i &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        pfail=$((pfail + 1))
        echo "soak: parallel run $((i + 1)) failed: $(head -c 300 /tmp/soak-perr.$$.$((i + 1)))"
    fi
done
t1=$(date +%s.%N)
echo "parallel: $parallel at once, $pfail failed, $(echo "$t1 - $t0" | bc) s"
rm -f /tmp/soak-err.$$ /tmp/soak-perr.$$.*

after=$(count)
echo "before: $before"
echo "after:  $after"
[ "$fail" -eq 0 ] && [ "$pfail" -eq 0 ] && [ "$before" = "$after" ]
