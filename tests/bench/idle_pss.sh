#!/bin/bash
# Memory of idle sandboxes: N detached sandboxes (`shoji run -d -- sleep`), restored from one VM
# template, then the total PSS and RSS of their sandbox processes (each holds its VMM and guest
# memory), against one sandbox alone. PSS splits a page shared by k processes k ways, so pages
# of the template's memory file that the guests only read are counted once in the total.
#
#   tests/bench/idle_pss.sh [N]        default 20; SHOJI_TEMPLATES=off for cold boots
set -eu
n=${1:-20}
root=$(cd "$(dirname "$0")/../.." && pwd)
shoji=${SHOJI:-}
for b in "$root/target/release/shoji" "$root/target/debug/shoji"; do
    [ -z "$shoji" ] && [ -x "$b" ] && shoji=$b
done
[ -x "$shoji" ] || { echo "idle_pss: no shoji binary"; exit 2; }

# Sum of a field of smaps_rollup (kB) over the detached sandbox processes.
sum() {
    local total=0 pid v
    for pid in $(pgrep -f "__sandbox"); do
        v=$(awk -v f="$1:" '$1 == f {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

measure() {
    local k=$1 names=() i
    for i in $(seq 1 "$k"); do
        names+=("pss-$$-$i")
        "$shoji" run -d --name "pss-$$-$i" -- sleep 100000 >/dev/null
    done
    sleep 5 # idle
    echo "$k sandbox(es): PSS $(( $(sum Pss) / 1024 )) MiB, RSS $(( $(sum Rss) / 1024 )) MiB"
    for i in "${names[@]}"; do "$shoji" kill "$i" >/dev/null; "$shoji" wait "$i" >/dev/null || true; "$shoji" rm "$i" >/dev/null; done
}

[ -z "$(pgrep -f __sandbox)" ] || { echo "idle_pss: detached sandboxes are running already"; exit 2; }
"$shoji" run -- true >/dev/null 2>&1 # builds the template when missing
measure 1
measure "$n"
