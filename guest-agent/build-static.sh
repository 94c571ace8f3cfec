#!/usr/bin/env bash
# Builds the static guest agent (shoji-agent, PID 1 of Shoji's Linux guest) and prints its path.
# The one build path for it: rootfs/build.sh and `shoji setup` (cli/src/artifacts.rs) call this.
#
#   guest-agent/build-static.sh            # prints target/agent/shoji-agent (stripped)
#   guest-agent/build-static.sh --symbols  # prints the same build with its symbol table
#
# Static glibc (crt-static), profile `agent`, its own target dir (target/agent), so a nested
# build from `cargo test` does not wait on the outer cargo's lock. $CARGO picks the cargo.
#
# No AVX in the agent's Rust code: on PVM hosts the guest kernel runs `noxsave`, so the upper
# YMM/ZMM halves are not switched between guest tasks (docs/kernel.md). glibc's AVX paths are off
# by GLIBC_TUNABLES (vmm/src/cmdline.rs); memchr and aho-corasick, which choose AVX2 at run time,
# are the vendored copies in guest-agent/vendor/ with that choice turned off, wired in by the
# workspace's [patch.crates-io] (committed in Cargo.lock; nothing is rewritten here).
# guest-agent/tests/static_binary.rs disassembles the result and fails on ymm/zmm in Rust code.
set -euo pipefail

symbols=0
case "${1:-}" in
  "") ;;
  --symbols) symbols=1 ;;
  *) echo "usage: $0 [--symbols]" >&2; exit 2 ;;
esac

ws=$(cd "$(dirname "$0")/.." && pwd)
target="$ws/target/agent"
cargo=${CARGO:-cargo}
triple=x86_64-unknown-linux-gnu

die() { echo "guest-agent/build-static.sh: $*" >&2; exit 1; }

# The patch is in use only while Cargo.lock resolves each crate to the vendored path (a registry
# entry has a `source`): a version bump elsewhere would silently bring the AVX2 path back.
for name in memchr aho-corasick; do
  awk -v n="$name" '$0 == "[[package]]" { name = "" } $1 == "name" { gsub(/"/, "", $3); name = $3 }
    $1 == "source" && name == n { bad = 1 } END { exit bad }' "$ws/Cargo.lock" ||
    die "Cargo.lock takes $name from a registry, not guest-agent/vendor/: see guest-agent/vendor/README.md"
done

mkdir -p "$target"
exec 9>"$target/.build.lock"
flock 9

unset CARGO_ENCODED_RUSTFLAGS
# Quiet (-q) when there is nothing to do. --locked: the build never changes Cargo.lock.
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target" \
  "$cargo" build -q --locked --profile agent --target "$triple" -p shoji-agent \
  --manifest-path "$ws/Cargo.toml" >&2

# The profile keeps the symbol table (for the test); the initramfs gets the stripped copy.
built="$target/$triple/agent/shoji-agent"
out="$target/shoji-agent"
if [ "$symbols" = 1 ]; then echo "$built"; exit 0; fi
strip --strip-all -o "$out.tmp" "$built"
if cmp -s "$out.tmp" "$out"; then rm -f "$out.tmp"; else mv "$out.tmp" "$out"; fi
echo "$out"
