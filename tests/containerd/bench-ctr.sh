#!/usr/bin/env bash
# Benchmark (not a test): wall time of `ctr run --rm IMAGE ID echo hi`, runc and our shim
# interleaved in one run against one private containerd; p50/p90/min/max per runtime.
#
#   SHIM_BIN=target/release/containerd-shim-shoji-v2 [SHOJI_SHIM_CONFIG=...] tests/containerd/bench-ctr.sh [N]
set -uo pipefail
N=${1:-20}
RUNTIME=io.containerd.shoji.v2
SHIM_BIN=${SHIM_BIN:?SHIM_BIN=path/to/containerd-shim-shoji-v2}
source "$(dirname "$0")/lib.sh"

echo "# ctr run --rm $IMG ID echo hi: $N runs per runtime, interleaved (runc, shoji, runc, ...)"
echo "# containerd $(containerd --version | awk '{print $3}'), snapshotter $SNAP, $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), kernel $(uname -r)"
echo "# /dev/kvm: $([ -d /sys/module/kvm_pvm ] && echo 'PVM (kvm_pvm)' || echo 'hardware KVM'); load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$N"); do
  for rt in runc shoji; do
    t0=$(date +%s%N)
    out=$(timeout -s KILL 600 $C run --rm --runtime "io.containerd.$rt.v2" --snapshotter "$SNAP" "$IMG" "b-$rt-$i" echo hi 2>&1)
    t1=$(date +%s%N)
    [ "$out" = hi ] || { echo "run $i with $rt failed: $out"; exit 1; }
    echo "$rt $(((t1 - t0) / 1000000))" >>"$WORK/times"
  done
done
python3 - "$WORK/times" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for rt, ms in rows:
    by.setdefault(rt, []).append(int(ms))
def pct(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
print("| runtime | runs | p50 ms | p90 ms | min ms | max ms |")
print("|---|---|---|---|---|---|")
for rt in ("runc", "shoji"):
    v = by[rt]
    print(f"| {rt} | {len(v)} | {pct(v,50)} | {pct(v,90)} | {min(v)} | {max(v)} |")
print(f"\nshoji/runc p50: {pct(by['shoji'],50)/pct(by['runc'],50):.1f}x")
PY
echo "# load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
