#!/usr/bin/env bash
# Drives a shim under a real, private containerd (Debian's package) with `ctr`, as a user would.
#
#   RUNTIME=io.containerd.shoji.v2 SHIM_BIN=target/debug/containerd-shim-shoji-v2 tests/containerd/containerd-it.sh
#   RUNTIME=io.containerd.runc.v2 tests/containerd/containerd-it.sh      # the same cases with runc
#
# Cases: echo; exit status 3; stderr; stdin piped through cat; a tty session; detached task +
# exec + ps + SIGKILL + delete; SIGKILL of the shim then delete; (our shim only) a guest that
# resets its VM ends the task with 255; (our shim only) guest root cannot plant links in the
# shared tree; (our shim only) a loop device passed with --device is hot-plugged, read, written,
# cgroup-confined and unplugged, and a char device refused; (our shim only) an ext4 volume from a
# block device and from an image file is plugged and mounted by the agent; (our shim only) task
# pause stops a ticking container and resume restarts it; containerd restarts under a running
# task; $CYCLES (default 20) run/delete
# cycles; then nothing of ours may be left: no shim process, mount, shim socket, sandbox
# directory, task or container. The cases and cycles run in $PAR (default 2) streams at once.
# Setup (private containerd, image): lib.sh.
# Needs root. Installs containerd, runc, busybox-static and python3 when missing.
# Prints "N passed, M failed"; exits non-zero on any failure.
set -uo pipefail

RUNTIME=${RUNTIME:?RUNTIME=io.containerd.NAME.v2}
SHIM_BIN=${SHIM_BIN:-}
CYCLES=${CYCLES:-20}
# Streams of cases at once (1: one after the other).
PAR=${PAR:-2}
# Per ctr call: a Linux guest boots slowly under PVM emulation (20-60 s, more under load).
T=${CTR_TIMEOUT:-400}
here=$(cd "$(dirname "$0")" && pwd)

source "$here/lib.sh"
echo "# containerd $(containerd --version | awk '{print $3}'), runtime $RUNTIME, snapshotter $SNAP, work $WORK"

# Results go to a file too: the streams are subshells.
ok() { echo "ok   - $1"; echo ok >>"$WORK/results"; }
no() {
  { echo "FAIL - $1"; shift; [ $# -gt 0 ] && printf '       %s\n' "$@"; } | tee -a "$WORK/failures"
  echo fail >>"$WORK/results"
}
# Devices a case made (lines "loop PATH" / "node PATH"), released when it is done or on exit.
dev_cleanup() {
  [ -f "$WORK/devices" ] || return 0
  while read -r kind path; do
    case $kind in
      node) rm -f "$path" ;;
      loop) losetup -d "$path" 2>/dev/null ;;
    esac
  done <"$WORK/devices"
  rm -f "$WORK/devices"
}
trap 'dev_cleanup; teardown' EXIT
ctr_() { timeout -s KILL "$T" $C "$@"; }
shim_sockets() { ls /run/containerd/s 2>/dev/null | sort; }
sandbox_dirs() { ls /run/shoji/s 2>/dev/null | sort; }
our_mounts() { grep -E " ($WORK|/run/shoji/s)[/ ]" /proc/self/mountinfo || true; }

sockets_before=$(shim_sockets)
dirs_before=$(sandbox_dirs)
R="--runtime $RUNTIME --snapshotter $SNAP"

# Each case_* function is one independent group of cases (own container ids): the groups and
# the run/delete cycles run in $PAR streams at once (each VM keeps about one core busy).
case_basic() {
  out=$(ctr_ run --rm $R $IMG t-echo echo hello 2>&1)
  [ "$out" = hello ] && ok "echo hello prints hello" || no "echo hello" "got: $out"

  ctr_ run --rm $R $IMG t-exit sh -c 'exit 3' >/dev/null 2>&1
  rc=$?
  [ $rc = 3 ] && ok "sh -c 'exit 3' exits 3" || no "exit 3" "got status $rc"

  out=$(ctr_ run --rm $R $IMG t-err sh -c 'echo to-out; echo to-err >&2' 2>"$WORK/err")
  err=$(cat "$WORK/err")
  [ "$out" = to-out ] && [ "$err" = to-err ] && ok "stdout and stderr stay apart" || no "stderr" "out: $out" "err: $err"

  # runc's shim loses a stdin EOF that comes before Start: keep the pipe open a moment.
  out=$( (printf 'piped line\n'; sleep 2) | ctr_ run --rm $R $IMG t-stdin cat 2>&1)
  [ "$out" = "piped line" ] && ok "stdin piped through cat" || no "stdin" "got: $out"

  # ctr -t needs a real terminal: script(1) gives it one. Once in a few dozen runs on a loaded
  # host the last line never reached script's output (seen once, with PAR=2; not reproduced in
  # 12 runs under load): a second try is allowed and said, so a steady loss still fails.
  tty_case() {
    timeout -s KILL "$T" script -qec "$C run --rm -t $R $IMG t-tty$1 sh -c 'tty && echo tty-ok'" /dev/null </dev/null 2>&1 |
      tr -d '\r\000'
  }
  tty_ok() { echo "$1" | grep -q '/dev/pts/' && echo "$1" | grep -q '^tty-ok'; }
  out=$(tty_case "")
  if ! tty_ok "$out"; then
    echo "# note: tty session, first try lost output: $(echo "$out" | tr '\n' '|'); trying again"
    out=$(tty_case 2)
  fi
  tty_ok "$out" && ok "tty session" || no "tty" "got: $out"

}

case_detached() {
  ctr_ run -d $R $IMG t-detached sleep 1000 >/dev/null 2>&1
  for _ in $(seq 60); do $C task ls 2>/dev/null | grep -qE '^t-detached .*RUNNING' && break; sleep 1; done
  $C task ls 2>/dev/null | grep -qE '^t-detached .*RUNNING' && ok "detached task is RUNNING" || no "detached" "$($C task ls 2>&1)"
  out=$(ctr_ task exec --exec-id e1 t-detached sh -c 'echo from-exec; exit 4' 2>&1)
  rc=$?
  [ "$out" = from-exec ] && [ $rc = 4 ] && ok "task exec prints and exits 4" || no "exec" "got: $out ($rc)"
  # A missing program: containerd gets Docker's 127 as the process's exit status (typed by the
  # agent, not guessed from words).
  # (Our shim only: runc's shim reports the exec failure its own way.)
  # ctr returns Start's error and deletes the process; the status containerd got is in the
  # TaskExit event the shim published.
  if [ "$RUNTIME" = io.containerd.shoji.v2 ]; then
    $C events >"$WORK/events" 2>&1 &
    events=$!
    sleep 1
    out=$(ctr_ task exec --exec-id e2 t-detached /nonexistent 2>&1)
    rc=$?
    sleep 1
    kill $events 2>/dev/null; wait $events 2>/dev/null
    exit_ev=$(grep '/tasks/exit' "$WORK/events" | grep '"id":"e2"' || true)
    echo "$out" | grep -q 'executable not found' && [ $rc != 0 ] && echo "$exit_ev" | grep -q '"exit_status":127' &&
      ok "task exec of a missing program: named, exit status 127" ||
      no "exec missing" "exec: $out ($rc)" "exit event: $exit_ev" "events: $(tail -5 "$WORK/events")"
  fi
  out=$(ctr_ task ps t-detached 2>&1)
  [ "$(echo "$out" | tail -n +2 | grep -c .)" -ge 1 ] && ok "task ps lists the processes" || no "task ps" "$out"
  ctr_ task kill -s SIGKILL t-detached
  # Usually a second; once in CI (containerd 2.1, our shim) the guest took over 60 s to report
  # the killed process's exit (not understood yet, see issue 14's note): the wait is generous,
  # and how long it took is printed so a slow stop shows.
  t0=$SECONDS
  for _ in $(seq 180); do $C task ls 2>/dev/null | grep -qE '^t-detached .*STOPPED' && break; sleep 1; done
  $C task ls 2>/dev/null | grep -qE '^t-detached .*STOPPED' && ok "SIGKILL stops it (in $((SECONDS - t0)) s)" ||
    no "kill" "$($C task ls 2>&1)"
  ctr_ task delete t-detached >/dev/null && ctr_ container delete t-detached >/dev/null &&
    ok "task and container delete" || no "delete"
}

case_k9() {
  # A shim killed with SIGKILL: containerd runs `<shim> delete`, which must clean up without it.
  ctr_ run -d $R $IMG t-k9 sleep 1000 >/dev/null 2>&1
  for _ in $(seq 60); do $C task ls 2>/dev/null | grep -qE '^t-k9 .*RUNNING' && break; sleep 1; done
  shim=$(pgrep -f -- "-id t-k9 -address $SOCK" | head -1)
  if [ -n "$shim" ]; then
    # Its own socket (other streams' shims come and go meanwhile): the path it listens on.
    inodes=$(ls -l "/proc/$shim/fd" 2>/dev/null | grep -o 'socket:\[[0-9]*\]' | tr -dc '0-9\n')
    k9_socket=$(awk '$8 ~ "^/run/containerd/s/" { print $7, $8 }' /proc/net/unix |
      grep -wFf <(echo "$inodes") | awk '{ print $2 }' | head -1)
    [ -n "$k9_socket" ] || no "the shim of t-k9 listens on a socket in /run/containerd/s" "$(cat /proc/net/unix | head -3)"
    kill -9 "$shim"
    for _ in $(seq 60); do $C task ls 2>/dev/null | grep -qE '^t-k9 .*RUNNING' || break; sleep 1; done
    ctr_ task delete t-k9 >/dev/null 2>&1
    ctr_ container delete t-k9 >/dev/null 2>&1
    $C container ls -q 2>/dev/null | grep -qx t-k9 && no "kill -9 of the shim" "container t-k9 is still there" ||
      ok "kill -9 of the shim, then delete"
    left=$( [ -n "$k9_socket" ] && [ -e "$k9_socket" ] && basename "$k9_socket")
    if [ -n "$left" ]; then
      if [ -n "$SHIM_BIN" ]; then
        no "the killed shim's socket is removed by its delete" "$left"
      else
        # containerd 1.6's runc shim leaves it (its delete does not remove the socket).
        echo "# note: the stock shim left /run/containerd/s/$left after SIGKILL; removed here"
        rm -f "/run/containerd/s/$left"
      fi
    fi
  else
    no "kill -9 of the shim" "no shim process for t-k9: $($C task ls 2>&1)"
  fi

}

case_crash() {
  # The sandbox VM dies under the task: the guest resets its machine through the i8042 (port 0x64,
  # via a /dev/port node the container makes in its /dev tmpfs). The task must end with our status
  # 255. Never with runc: that would reset this host. Privileged: an ordinary container may make
  # the node but the device cgroup refuses to open it, and virtio-fs (the rootfs) refuses device
  # nodes altogether (docs/security.md).
  if [ "$RUNTIME" = io.containerd.shoji.v2 ]; then
    out=$(ctr_ run --rm --privileged $R $IMG t-crash sh -c \
      'mknod /dev/port2 c 1 4 && printf "\376" | dd of=/dev/port2 bs=1 seek=100 count=1; sleep 100' 2>&1)
    rc=$?
    [ $rc = 255 ] && ok "a VM that dies ends the task with status 255" || no "VM death" "got status $rc: $out"
  fi

}

case_plant() {
  # Guest root plants symlinks in the shared tree (Kata's CVE-2020-2026 class): a privileged
  # container (as good as guest root) mounts the sandbox's virtio-fs share itself and tries to
  # replace the shim's mount points with links to /. The guest sees only a read-only view of the
  # shim's staging tree, so every attempt fails, and the host's staging tree holds no link.
  if [ "$RUNTIME" = io.containerd.shoji.v2 ]; then
    out=$(ctr_ run --rm --privileged $R $IMG t-plant sh -c '
      mkdir -p /x && mount -t virtiofs shared /x || exit 9
      ls /x | grep -qx t-plant || echo "NO-OWN-DIR"
      ln -s / /x/planted 2>&1
      ln -s / /x/t-plant/planted 2>&1
      mv /x/t-plant/rootfs /x/t-plant/moved 2>/dev/null && echo "MOVED"
      ls /x/t-plant/rootfs/bin/sh >/dev/null && echo own-rootfs-reachable' 2>&1)
    rc=$?
    links=$(find /run/shoji/s -path '*/staging/*' -type l 2>/dev/null | head -3)
    if [ $rc = 0 ] && [ "$(grep -c 'Read-only file system' <<<"$out")" = 2 ] &&
      grep -q own-rootfs-reachable <<<"$out" && ! grep -Eq 'NO-OWN-DIR|MOVED' <<<"$out" && [ -z "$links" ]; then
      ok "guest root cannot plant links in the shared tree"
    else
      no "guest root plants links" "status $rc: $out" "links in staging: $links"
    fi
  fi

}

case_device() {
  # Host block devices (our shim only): `ctr run --device` puts the container path and the host
  # node's numbers in linux.devices (never the host path); the shim finds the node by its numbers,
  # hot-plugs it as virtio-blk, and the agent gives the container a node with the guest's numbers,
  # rewriting the device cgroup to match. ctr 1.6's --device takes one path (no HOST:CONTAINER), so
  # the spec's path is a second host node of the loop device's numbers, $devnode: the container sees
  # /dev/xvdz while the shim opens /dev/loopN. A char device fails Create, naming it.
  if [ "$RUNTIME" = io.containerd.shoji.v2 ]; then
    devnode=/dev/xvdz
    [ -e $devnode ] && devnode=/dev/shoji-test-xvdz
    img=$WORK/disk.img
    { printf 'shoji-block-0123'; head -c $((1024 * 1024 - 16)) /dev/zero; } >"$img"
    loop=$(losetup -f --show "$img")
    echo "loop $loop" >>"$WORK/devices"
    lmaj=$((0x$(stat -c %t "$loop"))) lmin=$((0x$(stat -c %T "$loop")))
    echo "node $devnode" >>"$WORK/devices"
    mknod -m 600 "$devnode" b "$lmaj" "$lmin"
    out=$(ctr_ run --rm --device "$devnode" $R $IMG t-dev sh -c '
      d='"$devnode"'
      head -c 16 $d; echo
      ls -l $d
      printf from-the-container | dd of=$d bs=512 seek=1 conv=notrunc,sync,fsync 2>&1 >/dev/null && echo written
      maj=$(ls -l $d | awk "{print \$5}" | tr -d ,) min=$(ls -l $d | awk "{print \$6}")
      echo "neighbour: $( { mknod /dev/nb b $maj $((min + 16)) && head -c1 /dev/nb; } 2>&1 >/dev/null)"
      echo "host numbers: $( { mknod /dev/hn b '"$lmaj $lmin"' && head -c1 /dev/hn; } 2>&1 >/dev/null)"' 2>&1)
    rc=$?
    node=$(sed -n 2p <<<"$out")
    gmaj=$(awk '{print $5}' <<<"$node" | tr -d ,)
    [ $rc = 0 ] && [ "$(sed -n 1p <<<"$out")" = shoji-block-0123 ] && [ "${node:0:1}" = b ] &&
      [ -n "$gmaj" ] && [ "$gmaj" != "$lmaj" ] &&
      ok "ctr run --device: the container reads the loop device's bytes at $devnode, a node with the guest's numbers ($gmaj:x, host $lmaj:$lmin)" ||
      no "device read" "status $rc: $out"
    written=$(dd if="$img" bs=512 skip=1 count=1 2>/dev/null | head -c 18)
    grep -qx written <<<"$out" && [ "$written" = from-the-container ] &&
      ok "a write from the container lands in the host file" || no "device write" "host file: $written" "$out"
    grep -q '^neighbour: .*Operation not permitted' <<<"$out" && grep -q '^host numbers: .*Operation not permitted' <<<"$out" &&
      ok "the device cgroup denies a neighbour and the host's numbers" || no "device cgroup" "$out"
    for _ in $(seq 20); do grep -q 'container t-dev: .*: unplugged' "$WORK/containerd.log" && break; sleep 0.5; done
    unplugged=$(grep -o "container t-dev: $devnode (PCI [^)]*): unplugged.*" "$WORK/containerd.log" | head -1)
    grep -q 'released by the guest' <<<"$unplugged" && ok "delete unplugs it: $unplugged" ||
      no "device unplug" "log: ${unplugged:-none}" "$(grep 't-dev' "$WORK/containerd.log" | grep -iE 'device|plug' | tail -5)"

    out=$(ctr_ run --rm --device /dev/kmsg $R $IMG t-chr true 2>&1)
    rc=$?
    [ $rc != 0 ] && [ "$(grep -c 'linux.devices\[0\] /dev/kmsg: character devices cannot be passed into the sandbox' <<<"$out")" = 1 ] &&
      [ -z "$(our_mounts | grep t-chr)" ] && ! grep -q 't-chr.*plugged at PCI' "$WORK/containerd.log" &&
      ok "a char device fails Create with one line naming it: $(grep -o 'linux.devices.*sandbox' <<<"$out")" ||
      no "char device" "status $rc: $out"
    $C container delete t-chr >/dev/null 2>&1
    dev_cleanup
  fi
}

case_volume() {
  # Volumes as block devices (our shim only): an ext4 filesystem given as a mount, from a host
  # block device and from the image file itself, is hot-plugged as virtio-blk and mounted in the
  # guest by the agent (the host never mounts it); the container sees it at its destination;
  # delete unmounts and unplugs it.
  if [ "$RUNTIME" = io.containerd.shoji.v2 ]; then
    vdir=$WORK/voldata
    mkdir -p "$vdir" && echo from-the-volume >"$vdir/hello"
    vimg=$WORK/vol.img
    mkfs.ext4 -q -F -d "$vdir" "$vimg" 8M || { no "mkfs.ext4 -d (e2fsprogs)"; return; }
    vloop=$(losetup -f --show "$vimg")
    echo "loop $vloop" >>"$WORK/devices"
    out=$(ctr_ run --rm --mount "type=ext4,src=$vloop,dst=/data,options=rw" $R $IMG t-vol sh -c '
      cat /data/hello
      echo from-the-container >/data/new && sync && echo written
      grep " /data " /proc/mounts' 2>&1)
    rc=$?
    [ $rc = 0 ] && [ "$(sed -n 1p <<<"$out")" = from-the-volume ] && grep -qx written <<<"$out" &&
      grep -q '^/dev/vd[a-z]* /data ext4 rw' <<<"$out" &&
      ok "ctr run --mount type=ext4,src=$vloop: the agent mounts the block volume: $(grep ' /data ' <<<"$out")" ||
      no "block volume" "status $rc: $out"
    for _ in $(seq 20); do grep -q 'container t-vol: mounts.*unplugged' "$WORK/containerd.log" && break; sleep 0.5; done
    unplugged=$(grep -o "container t-vol: mounts\[[0-9]*\] /data (PCI [^)]*): unplugged.*" "$WORK/containerd.log" | head -1)
    grep -q 'released by the guest' <<<"$unplugged" && ok "delete unmounts and unplugs it: $unplugged" ||
      no "volume unplug" "log: ${unplugged:-none}" "$(grep 't-vol' "$WORK/containerd.log" | tail -5)"
    losetup -d "$vloop"
    # Unmounted in the guest before the unplug: the host reads the container's file from the
    # image as it is (no journal left to replay).
    got=$(debugfs -R 'cat /new' "$vimg" 2>/dev/null)
    [ "$got" = from-the-container ] && ok "the container's write is in the image" || no "volume write" "debugfs: $got"
    out=$(ctr_ run --rm --mount "type=ext4,src=$vimg,dst=/data,options=ro" $R $IMG t-volimg sh -c '
      cat /data/new; echo x >/data/x' 2>&1)
    rc=$?
    [ $rc != 0 ] && [ "$(sed -n 1p <<<"$out")" = from-the-container ] && grep -q 'Read-only file system' <<<"$out" &&
      grep -q 'container t-volimg: mounts\[[0-9]*\] /data: ext4 volume .*vol.img.* (read-only)' "$WORK/containerd.log" &&
      ok "an image file as a read-only volume: read, and a write refused" || no "image volume" "status $rc: $out"
    out=$(ctr_ run --rm --mount "type=ext4,src=/dev/kmsg,dst=/data" $R $IMG t-volchr true 2>&1)
    rc=$?
    [ $rc != 0 ] && [ "$(grep -c 'mounts\[[0-9]*\].source: /dev/kmsg: not a block device or an image file' <<<"$out")" = 1 ] &&
      ok "a char device as a volume fails Create naming the mount" || no "char volume" "status $rc: $out"
    $C container delete t-volchr >/dev/null 2>&1
    dev_cleanup
  fi
}

case_pause() {
  # Pause/Resume (our shim only): the sandbox VM's vCPUs stop (task ls: PAUSED), so a container
  # that ticks into a host directory stops ticking, and ticks again after resume.
  if [ "$RUNTIME" = io.containerd.shoji.v2 ]; then
    tick=$WORK/tick
    mkdir -p "$tick"
    ctr_ run -d --mount "type=bind,src=$tick,dst=/tick,options=rbind:rw" $R $IMG t-pause \
      sh -c 'while :; do echo x >>/tick/n; sleep 0.2; done' >/dev/null 2>&1
    ticks() { { wc -l <"$tick/n"; } 2>/dev/null || echo 0; }
    for _ in $(seq 240); do [ "$(ticks)" -gt 2 ] && break; sleep 0.5; done
    ctr_ task pause t-pause
    state=$($C task ls 2>/dev/null | awk '$1 == "t-pause" { print $3 }')
    sleep 0.5 # a tick the device thread was serving lands
    n1=$(ticks)
    sleep 3
    n2=$(ticks)
    ctr_ task resume t-pause
    for _ in $(seq 60); do [ "$(ticks)" -gt "$n2" ] && break; sleep 0.5; done
    n3=$(ticks)
    after=$($C task ls 2>/dev/null | awk '$1 == "t-pause" { print $3 }')
    [ "$state" = PAUSED ] && [ "$n1" -gt 0 ] && [ "$n1" = "$n2" ] && [ "$n3" -gt "$n2" ] && [ "$after" = RUNNING ] &&
      ok "task pause stops the ticks (PAUSED, $n1 -> $n2 in 3 s), resume restarts them ($n3)" ||
      no "pause/resume" "state $state -> $after, ticks $n1 $n2 $n3" "$(grep t-pause "$WORK/containerd.log" | grep -iE 'pause|resum' | tail -3)"
    ctr_ task kill -s SIGKILL t-pause
    for _ in $(seq 60); do $C task ls 2>/dev/null | grep -qE '^t-pause .*STOPPED' && break; sleep 1; done
    ctr_ task delete t-pause >/dev/null 2>&1
    ctr_ container delete t-pause >/dev/null 2>&1
  fi
}

# Run/delete cycles, numbered from a counter the streams share.
next_cycle() {
  (
    flock 8
    n=$(cat "$WORK/cycle.next" 2>/dev/null || echo 1)
    [ "$n" -le "$CYCLES" ] || exit 0
    echo $((n + 1)) >"$WORK/cycle.next"
    echo "$n"
  ) 8>"$WORK/cycle.lock"
}
cycles() {
  local i
  while i=$(next_cycle) && [ -n "$i" ]; do
    ctr_ run --rm $R $IMG "t-cycle-$i" true >/dev/null 2>&1 || echo "$i" >>"$WORK/cycle.failed"
  done
}

# Two streams of about equal work (VM boots); with PAR=1 one after the other.
stream1() { case_basic; case_detached; case_volume; cycles; }
stream2() { case_k9; case_crash; case_plant; case_device; case_pause; cycles; }
if [ "$PAR" -ge 2 ]; then
  stream1 &
  s1=$!
  stream2 &
  s2=$!
  wait $s1 $s2
else
  stream1
  stream2
fi
# containerd restarts under a running task (alone: the other streams' calls would fail): it finds
# the shim again by its address file, the task is still RUNNING, exec works, and it is stopped
# and deleted.
ctr_ run -d $R $IMG t-restart sleep 1000 >/dev/null 2>&1
for _ in $(seq 120); do $C task ls 2>/dev/null | grep -qE '^t-restart .*RUNNING' && break; sleep 1; done
kill -9 "$CPID"
wait "$CPID" 2>/dev/null
start_containerd
for _ in $(seq 60); do $C task ls 2>/dev/null | grep -qE '^t-restart .*RUNNING' && break; sleep 1; done
listed=$($C task ls 2>&1 | grep '^t-restart')
out=$(ctr_ task exec --exec-id r1 t-restart echo after-restart 2>&1)
ctr_ task kill -s SIGKILL t-restart
for _ in $(seq 60); do $C task ls 2>/dev/null | grep -qE '^t-restart .*STOPPED' && break; sleep 1; done
ctr_ task delete t-restart >/dev/null 2>&1
ctr_ container delete t-restart >/dev/null 2>&1
grep -q RUNNING <<<"$listed" && [ "$out" = after-restart ] && ! $C container ls -q 2>/dev/null | grep -qx t-restart &&
  ok "containerd restarted under a task: RUNNING again, exec works, then killed and deleted" ||
  no "containerd restart" "listed: $listed" "exec: $out" "$($C task ls 2>&1)"

failed_cycles=$(grep -c . "$WORK/cycle.failed" 2>/dev/null)
[ "${failed_cycles:-0}" = 0 ] && ok "$CYCLES run/delete cycles" ||
  no "cycles" "$failed_cycles of $CYCLES failed: $(tr '\n' ' ' <"$WORK/cycle.failed")"

# Shims exit after their last Shutdown; give them a moment.
for _ in $(seq 20); do [ -z "$(our_shims)" ] && break; sleep 0.5; done
[ -z "$(our_shims)" ] && ok "no shim process left" || no "shim processes left" "$(ps -o pid,args -p "$(our_shims | tr '\n' ',' | sed 's/,$//')")"
[ -z "$(our_mounts)" ] && ok "no mount left" || no "mounts left" "$(our_mounts)"
left=$(comm -13 <(echo "$sockets_before") <(shim_sockets))
if [ -z "$left" ]; then
  ok "no shim socket left"
elif [ -n "$SHIM_BIN" ]; then
  no "sockets left" "$left"
else
  # containerd 2.1's runc shim leaves one after the containerd restart case; ours must not.
  echo "# note: the stock shim left $(echo $left | tr '\n' ' ') in /run/containerd/s; removed here"
  for l in $left; do rm -f "/run/containerd/s/$l"; done
  ok "no shim socket left (stock shim: noted above)"
fi
[ "$(sandbox_dirs)" = "$dirs_before" ] && ok "no sandbox directory left" || no "sandbox dirs left" "$(sandbox_dirs)"
[ -z "$($C task ls -q 2>/dev/null)$($C container ls -q 2>/dev/null)" ] && ok "no task or container left" || no "left in containerd"

if [ "$RUNTIME" = io.containerd.shoji.v2 ]; then
  grep -q 'sandbox: agent ready' "$WORK/containerd.log" && ok "the shim's log reaches containerd's log" ||
    no "shim log" "no 'sandbox: agent ready' line in containerd's log"
fi

pass=$(grep -cx ok "$WORK/results") fail=$(grep -cx fail "$WORK/results")
echo "$pass passed, $fail failed"
if [ "$fail" -gt 0 ]; then
  echo "--- failures"
  cat "$WORK/failures"
  echo "--- containerd log (shim lines, last 60)"
  grep -iE 'shim|shoji|error' "$WORK/containerd.log" | tail -60
  exit 1
fi
