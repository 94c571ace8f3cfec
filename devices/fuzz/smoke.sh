#!/usr/bin/env bash
# Fuzz smoke test: every cargo-fuzz target for SECONDS (default 60) from the committed corpus,
# in devices/fuzz (what the guest writes), cli/fuzz (the OCI layer unpacker) and guest-agent/fuzz
# (the agent's spec checks and mount options).
# A crash fails the run (libFuzzer exits non-zero and leaves the input in <crate>/fuzz/artifacts/).
# Stable Rust: RUSTC_BOOTSTRAP lets cargo-fuzz pass -Zsanitizer=address.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
# One target dir for the three fuzz workspaces: the dependencies they share (tokio, serde, the
# rust-vmm crates, ...) are built once with the sanitizer flags, not three times.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/fuzz}
for crate in devices cli guest-agent; do
  pushd "$crate" >/dev/null
  # Every target of the crate in one build (its binaries compile in parallel); `run` then finds
  # them built.
  cargo fuzz build
  for t in $(cargo fuzz list); do
    echo "== fuzz $crate/$t for ${secs}s"
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    if ! cargo fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" >"$log" 2>&1; then
      tail -n 60 "$log"
      echo "fuzz: $t crashed; the input is in $crate/fuzz/artifacts/$t/"
      rm -f "$log"
      exit 1
    fi
    grep -E "^Done" "$log" || true
    rm -f "$log"
  done
  popd >/dev/null
done
