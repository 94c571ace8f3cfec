#!/usr/bin/env bash
# Builds Shoji's guest kernel (an uncompressed ELF vmlinux with the PVH note) from Debian's
# linux-source-6.1, our config fragment and our small PVM patch, and caches it by content hash.
#
#   kernel-config/build.sh            # build (or reuse) and print the vmlinux path
#   SHOJI_CACHE=/path kernel-config/build.sh
#
# The cache key hashes shoji.config + pvm-guest.patch + this script, so any change rebuilds and an
# unchanged tree never does (~13 min on 2 cores). `shoji` computes the same key to find the result.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${SHOJI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shoji}
key=$(cat "$here/shoji.config" "$here/pvm-guest.patch" "$here/build.sh" | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
jobs=${SHOJI_KERNEL_JOBS:-$(nproc)}

log() { printf 'kernel-config: %s\n' "$*" >&2; }

if [ -f "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache/kernel"
exec 9>"$cache/kernel/.lock"
flock 9
if [ -f "$out/vmlinux" ]; then echo "$out/vmlinux"; exit 0; fi

tarball=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)
if [ -z "$tarball" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing linux-source-6.1 and the kernel build tools (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq linux-source-6.1 bc bison flex libelf-dev libssl-dev xz-utils make gcc >&2
    tarball=$(ls /usr/src/linux-source-6.1.tar.* | head -n1)
  else
    log "error: /usr/src/linux-source-6.1.tar.xz is missing; run: sudo apt-get install linux-source-6.1 bc bison flex libelf-dev"
    exit 1
  fi
fi

work="$cache/kernel-build/$key"
rm -rf "$work"
mkdir -p "$work"
log "unpacking $tarball"
tar -C "$work" -xf "$tarball"
src=$(echo "$work"/linux-source-6.1)
cd "$src"
log "applying pvm-guest.patch"
patch -p1 -s <"$here/pvm-guest.patch"

log "configuring: tinyconfig + shoji.config"
make -s ARCH=x86_64 tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$here/shoji.config" >/dev/null
make -s ARCH=x86_64 olddefconfig >&2

# Every line of the fragment must have stuck: a silently dropped option breaks the guest later.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" .config || { log "fragment line did not stick: $line ($(grep "^${line%%=*}=\|^# ${line%%=*} is" .config || echo unset))"; bad=1; } ;;
    "# CONFIG_"*" is not set") sym=${line#\# }; sym=${sym%% *}; if grep -q "^$sym=" .config; then log "fragment line did not stick: $line"; bad=1; fi ;;
  esac
done <"$here/shoji.config"
[ "$bad" = 0 ] || { log "error: config fragment not applied"; exit 1; }

log "building vmlinux with -j$jobs (about 13 min on 2 cores)"
start=$(date +%s)
make -s ARCH=x86_64 -j"$jobs" vmlinux >&2
log "built in $(( $(date +%s) - start )) s"

tmp="$out.tmp.$$"
mkdir -p "$tmp"
strip -o "$tmp/vmlinux" vmlinux
cp .config "$tmp/config"
cp System.map "$tmp/System.map"
rm -rf "$out"
mv "$tmp" "$out"
# The build tree is large; keep it only when asked (patch-only rebuilds then take seconds).
[ "${SHOJI_KEEP_KERNEL_TREE:-0}" = 1 ] || rm -rf "$work"
log "cached $out/vmlinux"
echo "$out/vmlinux"
