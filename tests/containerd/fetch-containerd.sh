#!/usr/bin/env bash
# Fetches Debian's containerd package of another suite (trixie: 1.7, unstable: 2.1) without
# touching the machine's apt sources, and unpacks its binaries (containerd, ctr,
# containerd-shim-runc-v2) into the cache. Prints the directory holding them; cached after the
# first run. The containerd and CRI suites run once per containerd: the host's, then these.
#
#   tests/containerd/fetch-containerd.sh unstable   # -> $SHOJI_CACHE/containerd/unstable/usr/bin
set -euo pipefail
suite=${1:?usage: fetch-containerd.sh SUITE (trixie or unstable)}
case "$suite" in trixie | unstable) ;; *) echo "fetch-containerd.sh: unknown suite $suite" >&2; exit 2 ;; esac
cache=${SHOJI_CACHE:-${HOME:?}/.cache/shoji}/containerd/$suite
bin=$cache/usr/bin
if [ -x "$bin/containerd" ] && [ -x "$bin/ctr" ] && [ -x "$bin/containerd-shim-runc-v2" ]; then
  echo "$bin"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
  >"$work/sources.list"
apt=(apt-get -qq -o "Dir::Etc::sourcelist=$work/sources.list" -o Dir::Etc::sourceparts=- \
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root)
"${apt[@]}" update >&2
(cd "$work" && "${apt[@]}" download containerd >&2)
mkdir -p "$(dirname "$cache")"
rm -rf "$cache.tmp"
dpkg-deb -x "$work"/containerd_*.deb "$cache.tmp"
"$cache.tmp/usr/bin/containerd" --version >&2
rm -rf "$cache"
mv "$cache.tmp" "$cache"
echo "$bin"
