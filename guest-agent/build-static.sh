#!/usr/bin/env bash
# Builds the static guest agent (shoji-agent, PID 1 of Shoji's Linux guest) and prints its path.
# The one build path for it: rootfs/build.sh and vmm/src/artifacts.rs (`agent_binary`) call this.
#
#   guest-agent/build-static.sh            # prints target/agent/shoji-agent (stripped)
#   guest-agent/build-static.sh --symbols  # prints the same build with its symbol table
#
# Static glibc (crt-static), profile `agent`, its own target dir (target/agent), so a nested
# build from `cargo test` does not wait on the outer cargo's lock. $CARGO picks the cargo.
#
# No AVX in the agent's Rust code: on PVM hosts the guest kernel runs `noxsave`, so the upper
# YMM/ZMM halves are not switched between guest tasks (docs/kernel.md). glibc's AVX paths are off
# by GLIBC_TUNABLES (vmm/src/cmdline.rs); memchr and aho-corasick choose AVX2 at run time with
# `std::is_x86_feature_detected!("avx2")`. The agent is built against copies of exactly the
# versions in Cargo.lock with that test replaced by `false` (their SSE2/SSSE3 code stays), under
# target/agent/patched/ (never committed), through `cargo --config patch.crates-io...`. The host
# VMM keeps the registry crates. Patching rewrites Cargo.lock, so it is restored afterwards.
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
# crate name, then how many non-test `is_x86_feature_detected!("avx2")` its locked version has.
crates=("memchr 4" "aho-corasick 2")
needle='std::is_x86_feature_detected!("avx2")'

die() { echo "guest-agent/build-static.sh: $*" >&2; exit 1; }

mkdir -p "$target/patched"
exec 9>"$target/.build.lock"
flock 9

# A build killed half-way leaves the patched lock file: put the saved one back first.
lock="$ws/Cargo.lock"
saved="$target/Cargo.lock.saved"
if [ -f "$saved" ]; then
  cp "$saved" "$lock"
  rm -f "$saved"
fi

# The locked version of a crate (exactly one, or we would have to patch several).
locked_version() {
  local v
  v=$(awk -v n="$1" '$0 == "[[package]]" { name = "" } $1 == "name" { gsub(/"/, "", $3); name = $3 }
    $1 == "version" && name == n { gsub(/"/, "", $3); print $3 }' "$lock")
  [ -n "$v" ] || die "$1 is not in Cargo.lock; is it still in the agent's dependency tree?"
  [ "$(wc -l <<<"$v")" = 1 ] || die "Cargo.lock has several versions of $1 ($(echo $v)); patch each"
  echo "$v"
}

# `cargo metadata` fetches the sources if needed and says where the registry keeps them.
meta=$("$cargo" metadata --format-version 1 --locked --filter-platform "$triple" --manifest-path "$ws/Cargo.toml")

patches=()
for entry in "${crates[@]}"; do
  read -r name expected <<<"$entry"
  version=$(locked_version "$name")
  manifest=$(grep -o "\"manifest_path\":\"[^\"]*/$name-$version/Cargo.toml\"" <<<"$meta" | head -1 | cut -d'"' -f4)
  [ -n "$manifest" ] && [ -f "$manifest" ] || die "no registry source for $name $version in cargo metadata"
  src=$(dirname "$manifest")
  dst="$target/patched/$name-$version"
  tmp="$target/patched/.$name-$version.tmp"
  rm -rf "$tmp"
  cp -r "$src" "$tmp"
  # Non-test sources: everything under src/ but tests.rs files and tests/ directories.
  files=$(cd "$tmp" && find src -name '*.rs' ! -name tests.rs ! -path '*/tests/*' | sort)
  count=0
  for f in $files; do
    n=$({ grep -oF "$needle" "$tmp/$f" || true; } | wc -l)
    if [ "$n" -gt 0 ]; then
      sed -i 's/std::is_x86_feature_detected!("avx2")/false/g' "$tmp/$f"
      count=$((count + n))
    fi
  done
  if [ "$count" != "$expected" ]; then
    rm -rf "$tmp"
    die "$name $version has $count non-test $needle, this script expects $expected: upstream changed;
  check that replacing each with false still turns AVX2 off (guest-agent/tests/static_binary.rs
  checks the binary), then update the count in guest-agent/build-static.sh"
  fi
  grep -rqF "$needle" --include='*.rs' --exclude=tests.rs --exclude-dir=tests "$tmp/src" &&
    die "$name $version: $needle left after patching"
  # A path dependency's lints are not capped as a registry crate's are; the patch leaves some
  # code unused. Not our code to lint.
  sed -i '1i #![allow(warnings)] // shoji: patched copy, see guest-agent/build-static.sh' "$tmp/src/lib.rs"
  # Keep an identical earlier copy (and its mtimes), so cargo does not rebuild and relink.
  if [ -d "$dst" ] && diff -rq "$tmp" "$dst" >/dev/null; then
    rm -rf "$tmp"
  else
    rm -rf "$dst"
    mv "$tmp" "$dst"
  fi
  patches+=(--config "patch.crates-io.$name.path=\"$dst\"")
done

# The patches make cargo rewrite Cargo.lock (path sources): keep the committed one.
cp "$lock" "$saved"
restore() { cp "$saved" "$lock" && rm -f "$saved"; }
trap restore EXIT
trap 'exit 130' INT TERM
unset CARGO_ENCODED_RUSTFLAGS
# Quiet (-q) when there is nothing to do: `shoji run` calls this before every run.
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target" \
  "$cargo" build -q "${patches[@]}" --profile agent --target "$triple" -p shoji-agent \
  --manifest-path "$ws/Cargo.toml" >&2
restore
trap - EXIT

# The profile keeps the symbol table (for the test); the initramfs gets the stripped copy.
built="$target/$triple/agent/shoji-agent"
out="$target/shoji-agent"
if [ "$symbols" = 1 ]; then echo "$built"; exit 0; fi
strip --strip-all -o "$out.tmp" "$built"
if cmp -s "$out.tmp" "$out"; then rm -f "$out.tmp"; else mv "$out.tmp" "$out"; fi
echo "$out"
