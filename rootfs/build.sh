#!/usr/bin/env bash
# Builds Shoji's guest initramfs (uncompressed newc cpio: the PVM guest unpacks ~1 MiB/s, so it
# stays small) and caches it by content hash, like kernel-config/build.sh.
#
#   rootfs/build.sh        # prints the path of initramfs.cpio
#
# Contents: /dev/console (c 5 1, so PID 1 has a console before devtmpfs), /proc, /sys, /tmp,
# /init = the static guest agent (shoji-agent), and /selftest = a tiny static C init that
# reports what the guest sees (boot with `rdinit=/selftest`; the VMM's device tests use it).
#
# The agent comes from $SHOJI_AGENT, or is built here from the workspace by
# guest-agent/build-static.sh (static, without AVX). Without either, /init is the C init too.
#
# With an agent, the build is also recorded as the current one: $cache/rootfs/current holds its
# key (replaced by rename), which is how the sandbox library and the shim find the initramfs
# (sandbox/src/artifacts.rs); `shoji setup` runs an embedded copy of this script.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${SHOJI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shoji}
agent=${SHOJI_AGENT:-}
if [ -z "$agent" ] && [ -f "$here/../guest-agent/Cargo.toml" ]; then
  agent=$("$here/../guest-agent/build-static.sh")
fi
key=$(cat "$here/init.c" "$here/mkcpio.c" "$here/build.sh" ${agent:+"$agent"} | sha256sum | cut -c1-16)
out="$cache/rootfs/$key"

# Done: record it as current (only an initramfs with the agent as /init can run sandboxes).
finish() {
  if [ -n "$agent" ]; then
    printf '%s\n' "$key" >"$cache/rootfs/.current.$$"
    mv -f "$cache/rootfs/.current.$$" "$cache/rootfs/current"
  fi
  echo "$out/initramfs.cpio"
  exit 0
}

if [ -f "$out/initramfs.cpio" ]; then finish; fi
mkdir -p "$cache/rootfs"
exec 9>"$cache/rootfs/.lock"
flock 9
if [ -f "$out/initramfs.cpio" ]; then finish; fi

tmp=$(mktemp -d "$cache/rootfs/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if command -v musl-gcc >/dev/null; then
  musl-gcc -static -Os -s -o "$tmp/selftest" "$here/init.c"
else
  echo "rootfs: musl-gcc not found (apt-get install musl-tools); using glibc -static" >&2
  gcc -static -Os -s -o "$tmp/selftest" "$here/init.c"
fi
init=${agent:-$tmp/selftest}
gcc -O2 -Wall -o "$tmp/mkcpio" "$here/mkcpio.c"
"$tmp/mkcpio" >"$tmp/initramfs.cpio" <<LIST
dir /dev 0755
nod /dev/console 0600 c 5 1
dir /proc 0755
dir /sys 0755
dir /tmp 1777
file /init $init 0755
file /selftest $tmp/selftest 0755
LIST
mkdir -p "$out.tmp"
mv "$tmp/initramfs.cpio" "$out.tmp/initramfs.cpio"
rm -rf "$out"
mv "$out.tmp" "$out"
finish
