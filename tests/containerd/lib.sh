# Shared by containerd-it.sh and bench-ctr.sh: a private containerd (Debian's package) in a temp
# dir, our shim linked into its PATH, and a busybox image built here (no network).
#
# In:  SHIM_BIN (optional: a shim binary), RUNTIME (io.containerd.NAME.v2, for SHIM_BIN's name)
# Out: WORK, SOCK, C (the ctr command), IMG, SNAP (overlayfs or native), CPID, start_containerd;
# teardown on EXIT.

[ "$(id -u)" = 0 ] || { echo "containerd tests: need root (containerd, mounts)"; exit 2; }
missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
{ [ -x /bin/busybox ] && ! head -c 8192 /bin/busybox | grep -q ld-linux; } || missing+=(busybox-static)
command -v python3 >/dev/null || missing+=(python3)
command -v script >/dev/null || missing+=(bsdutils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "containerd tests: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null ||
    { echo "containerd tests: apt-get install ${missing[*]} failed"; exit 2; }
fi

WORK=$(mktemp -d /tmp/shoji-containerd.XXXXXX)
SOCK=$WORK/containerd.sock
C="ctr --address $SOCK"
IMG=docker.io/library/busybox:test
CPID=

our_shims() { pgrep -f -- "-address $SOCK" | grep -v "^$$\$" || true; }

teardown() {
  set +e
  for t in $($C task ls -q 2>/dev/null); do $C task kill -s SIGKILL "$t" >/dev/null 2>&1; done
  sleep 1
  for t in $($C task ls -q 2>/dev/null); do $C task delete -f "$t" >/dev/null 2>&1; done
  for c in $($C container ls -q 2>/dev/null); do $C container delete "$c" >/dev/null 2>&1; done
  [ -n "$CPID" ] && kill "$CPID" 2>/dev/null && wait "$CPID" 2>/dev/null
  for p in $(our_shims); do kill -9 "$p" 2>/dev/null; done
  grep -oE " $WORK[^ ]*" /proc/self/mountinfo | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  rm -rf "$WORK"
}
trap teardown EXIT

mkdir -p "$WORK/opt/bin"
if [ -n "${SHIM_BIN:-}" ]; then
  name=${RUNTIME#io.containerd.}
  name=${name%.v2}
  ln -s "$(readlink -f "$SHIM_BIN")" "$WORK/opt/bin/containerd-shim-$name-v2"
fi
cat >"$WORK/config.toml" <<EOF_CONFIG
version = 2
root = "$WORK/root"
state = "$WORK/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$SOCK"
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "$WORK/opt"
EOF_CONFIG
# Also called again by a test that restarts containerd (its log goes on in the same file).
start_containerd() {
  containerd --config "$WORK/config.toml" >>"$WORK/containerd.log" 2>&1 &
  CPID=$!
  for _ in $(seq 100); do $C version >/dev/null 2>&1 && break; sleep 0.1; done
  $C version >/dev/null 2>&1 || { echo "containerd did not start:"; tail -20 "$WORK/containerd.log"; exit 1; }
}
start_containerd
SNAP=overlayfs
$C plugins ls 2>/dev/null | grep -E 'io.containerd.snapshotter.v1 +overlayfs .* ok' >/dev/null || SNAP=native

python3 "$(dirname "${BASH_SOURCE[0]}")/make-busybox-image.py" "$WORK/bb.tar" "$IMG" >/dev/null &&
  $C image import "$WORK/bb.tar" >/dev/null || { echo "image import failed"; exit 1; }
