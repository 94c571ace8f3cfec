#!/bin/sh
# protoc for the k8s-cri crate's build script (PROTOC, set by .cargo/config.toml): Debian's
# protobuf-compiler, installed with apt on first use when run as root (as the guest kernel build
# installs its packages); otherwise one line saying what to install.
set -e
p=$(command -v protoc || true)
if [ -z "$p" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "tests/protoc.sh: installing protobuf-compiler (apt) for the k8s-cri crate" >&2
  (
    flock 9
    command -v protoc >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        protobuf-compiler; } >/dev/null 2>&1
  ) 9>/tmp/.shoji-protoc.lock
  p=$(command -v protoc || true)
fi
if [ -z "$p" ]; then
  echo "tests/protoc.sh: protoc not found: apt-get install protobuf-compiler (the CRI client of tests/cri.rs needs it), or set PROTOC" >&2
  exit 1
fi
exec "$p" "$@"
