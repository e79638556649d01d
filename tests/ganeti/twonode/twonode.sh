#!/bin/bash
# twonode.sh -- a throwaway two-node Ganeti 3.0 cluster on one Linux host, for the provider's
# cross-node tests (tests/ganeti/twonode/conftest.py runs "setup" once per test session and
# "teardown" at its end, also when tests fail; both are idempotent).
#
# Adapted from a tested two-node cluster recipe (Debian 12, ganeti 3.0.2, as root, without
# systemd).  No apt here: .ci/setup installs ganeti and openssh-server.
#
# Each node ("node1" = master, "node2") is a set of Linux namespaces made with unshare(1): own
# PID 1 (a reaper; killing it ends everything in the node), hostname, network (a veth into the
# host bridge gnttn0, which has no IP: nothing of the cluster is on the host's interfaces) and
# private bind mounts over every path a node keeps state in: /etc/ganeti /var/lib/ganeti
# /var/log/ganeti /srv/ganeti /var/cache /etc/ssh /root /etc/hosts /etc/resolv.conf, plus its own
# /run and /sys.  /usr, /opt and /tmp are the host's and shared by both nodes: an OS definition
# under /usr/share/ganeti/os would be "on both nodes" without any copy, so the tests install
# theirs under /srv/ganeti/os.  Each node runs its own sshd (Ganeti's node add, copyfile and
# command use SSH as root) and its own Ganeti daemons, started by Ganeti's daemon-util.
#
# Usage
#   twonode.sh setup | teardown | status | verify
#   twonode.sh exec NODE CMD [ARG...]   # CMD inside NODE (node1|node2), clean env, stdin passed
#   twonode.sh gnt CMD [ARG...]         # = exec node1 CMD (the master)
# verify runs gnt-cluster verify -I ENODESETUP: this kernel's /proc/sysrq-trigger is missing
# and ENODESETUP covers only the /proc and /sys checks, so exit 0 means a clean cluster.
#
# What Ganeti does across nodes that a test must know:
#   * gnt-backup import exits 0 even when the OS import script failed (a WARNING "... were
#     not imported successfully" only): check the data.
#   * import always runs the rename script afterwards.
#   * exporting a running file instance needs --long-sleep.
#   * the receiving node's import daemon listens on an ephemeral port.
#
# Tunables (environment): TN_BASE (work dir, /tmp/twonode), TN_NET (first three octets of the
# /24, 203.0.113), TN_DOMAIN (example.test), TN_HOST_BRIDGE (gnttn0), TN_NODE_BRIDGE (gntbr0),
# TN_TEMPLATES (enabled disk templates, file,sharedfile).
set -euo pipefail

TN_BASE=${TN_BASE:-/tmp/twonode}
TN_NET=${TN_NET:-203.0.113}
TN_DOMAIN=${TN_DOMAIN:-example.test}
TN_HOST_BRIDGE=${TN_HOST_BRIDGE:-gnttn0}
TN_NODE_BRIDGE=${TN_NODE_BRIDGE:-gntbr0}
TN_TEMPLATES=${TN_TEMPLATES:-file,sharedfile}

NODES=(node1 node2)
MASTER=node1
CLUSTER_NAME=cluster.$TN_DOMAIN
CLUSTER_IP=$TN_NET.10
STATE=$TN_BASE/state          # pid files
NODEDIR=$TN_BASE/nodes        # per-node private directories
SHARED_FS=$TN_BASE/shared-file-storage
LOGDIR=$TN_BASE/logs
BINDIR=$TN_BASE/bin
HOSTS_FILE=$TN_BASE/hosts
RESOLV_FILE=$TN_BASE/resolv.conf
# The system python: ganeti's scripts are #!/usr/bin/python3; a pyenv shim
# earlier in root's PATH must not be used for anything here.
PY=/usr/bin/python3
CLEAN_PATH=/usr/sbin:/usr/bin:/sbin:/bin

node_ip() { case $1 in node1) echo "$TN_NET.1" ;; node2) echo "$TN_NET.2" ;;
            *) echo "unknown node $1" >&2; return 1 ;; esac; }
node_fqdn() { echo "$1.$TN_DOMAIN"; }

ts() { date +%s.%N; }
step() { echo "=== $(date +%T) $*"; }
elapsed() { awk -v a="$1" -v b="$(ts)" 'BEGIN{printf "%.1f", b-a}'; }

# ---------------------------------------------------------------- processes

# Host PID of the node's PID 1 (the reaper), or failure if it is not running.
# The pid file is trusted only if /proc/PID/cmdline is really our reaper for
# that node (guards against PID reuse).
node_pid() {
  local n=$1 pid
  [ -s "$STATE/$n.pid" ] || return 1
  pid=$(cat "$STATE/$n.pid")
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$BINDIR/tn-init.py $n" || return 1
  echo "$pid"
}

# nx NODE CMD...: run CMD inside all of NODE's namespaces with a clean
# environment.  The clean env matters: daemons started by `gnt-cluster init`
# or daemon-util inherit it, and Ganeti passes the daemons' environment on to
# OS import/export scripts.
# NX_TIMEOUT=SECS (optional) bounds the command's run time.
nx() {
  local n=$1 pid to=(); shift
  pid=$(node_pid "$n") || { echo "node $n is not running" >&2; return 1; }
  [ -n "${NX_TIMEOUT:-}" ] && to=(timeout -k 10 "$NX_TIMEOUT")
  "${to[@]}" nsenter -t "$pid" -m -u -i -n -p -- \
    env -i -C / PATH=$CLEAN_PATH LANG=C.UTF-8 HOME=/root TERM=dumb "$@"
}
gnt() { nx "$MASTER" "$@"; }

# --------------------------------------------------------------------- setup

require_packages() {
  local t
  for t in /usr/sbin/gnt-cluster /usr/sbin/sshd unshare nsenter ssh-keygen fping socat; do
    command -v "$t" >/dev/null || { echo "$t missing: run .ci/setup" >&2; return 1; }
  done
}

write_helpers() {
  mkdir -p "$BINDIR" "$STATE" "$NODEDIR" "$LOGDIR" "$SHARED_FS"
  # PID 1 of each node's PID namespace.  It must reap orphans: Ganeti daemons
  # (and the import/export daemons noded spawns) double-fork and end up as
  # its children; un-reaped zombies would look "alive" to pid checks.
  cat > "$BINDIR/tn-init.py" <<'EOF'
#!/usr/bin/python3
# PID 1 of a two-node-cluster.sh node: reap children, exit on SIGTERM (which
# makes the kernel SIGKILL every other process of the PID namespace).
import os, signal
def reap(*_):
    while True:
        try:
            pid, _st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
signal.signal(signal.SIGCHLD, reap)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
signal.signal(signal.SIGINT, lambda *_: os._exit(0))
signal.signal(signal.SIGHUP, signal.SIG_IGN)
while True:
    signal.pause()
EOF
  chmod 755 "$BINDIR/tn-init.py"

  # /etc/hosts seen by BOTH nodes (bind-mounted; the host's file is never
  # touched).  Node names must resolve to their bridge IPs, never loopback.
  {
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    for n in "${NODES[@]}"; do echo "$(node_ip "$n") $(node_fqdn "$n") $n"; done
    echo "$CLUSTER_IP $CLUSTER_NAME"
    for i in $(seq 1 9); do echo "$TN_NET.$((20+i)) inst$i.$TN_DOMAIN inst$i"; done
  } > "$HOSTS_FILE"
  # No DNS inside the nodes: anything not in /etc/hosts fails fast on lo.
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "$RESOLV_FILE"
}

# Per-node directories that are bind-mounted over the host paths.
prepare_node_dirs() {
  local n=$1 d=$NODEDIR/$1
  rm -rf "$d"
  mkdir -p "$d"/{var-lib-ganeti,var-log-ganeti,var-cache,srv-ganeti,etc-ssh,root/.ssh}
  # export dir: Ganeti only creates it on a node's first export ("?" in
  # `gnt-backup list` until then); pre-create it like the host's (0700 root)
  install -d -m 0700 "$d/var-lib-ganeti/export"
  mkdir -p "$d"/srv-ganeti/{os,file-storage,shared-file-storage}
  chmod 700 "$d/root" "$d/root/.ssh"
  # /etc/ganeti: the package's symlinks (share -> /usr/share/ganeti/3.0,
  # lib -> /usr/lib/ganeti/3.0; every gnt-* and ganeti-* binary goes through
  # them) and the ifup helpers; file-storage-paths is per node.
  mkdir -p "$d/etc-ganeti"
  cp -a /etc/ganeti/share /etc/ganeti/lib "$d/etc-ganeti/"
  for f in kvm-ifup-os xen-ifup-os; do
    [ -e /etc/ganeti/$f ] && cp -a /etc/ganeti/$f "$d/etc-ganeti/"
  done
  printf '/srv/ganeti/file-storage\n/srv/ganeti/shared-file-storage\n' \
    > "$d/etc-ganeti/file-storage-paths"
  # /etc/ssh: the host's client config, a minimal sshd_config and FRESH host
  # keys per node (as on two separate machines; `gnt-node add` replaces
  # node2's rsa/ecdsa/dsa keys by the master's and restarts sshd through
  # `daemon-util reload-ssh-keys` = `service ssh restart`).
  cp -a /etc/ssh/ssh_config /etc/ssh/moduli "$d/etc-ssh/" 2>/dev/null || true
  [ -d /etc/ssh/ssh_config.d ] && cp -a /etc/ssh/ssh_config.d "$d/etc-ssh/"
  mkdir -p "$d/etc-ssh/sshd_config.d"
  cat > "$d/etc-ssh/sshd_config" <<EOF
# sshd of Ganeti test node $n (two-node-cluster.sh); runs in the node's netns
Port 22
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# no PAM: nothing to gain in a throwaway namespace, and pam_loginuid /
# pam_systemd only add failure modes
UsePAM no
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
PidFile /run/sshd.pid
# scp in OpenSSH >= 9 uses SFTP (gnt-cluster copyfile uses scp)
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
  for t in rsa ecdsa ed25519; do
    ssh-keygen -q -t $t -N '' -C "root@$n" -f "$d/etc-ssh/ssh_host_${t}_key"
  done
}

host_network() {
  step "host bridge $TN_HOST_BRIDGE (no IP: the host is not on the cluster net)"
  ip link show "$TN_HOST_BRIDGE" >/dev/null 2>&1 ||
    ip link add name "$TN_HOST_BRIDGE" type bridge
  ip link set "$TN_HOST_BRIDGE" up
}

# Start node N: namespaces + mounts + network + sshd.
start_node() {
  local n=$1 d=$NODEDIR/$1 ip upid pid i
  ip=$(node_ip "$n")
  step "$n: namespaces (pid,mnt,uts,net,ipc), $ip"
  # setsid: detach from our session so the node outlives this script.
  # unshare --fork --pid: the child (tn-init.py) is PID 1 of the new PID ns;
  # --mount-proc gives it a matching /proc; --propagation private (unshare's
  # default, spelled out) keeps every mount below out of the host.
  # shellcheck disable=SC2016  # $$ and $1 belong to the inner bash
  setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$STATE/$n.unshare" \
    unshare --fork --pid --mount-proc --mount --uts --ipc --net \
            --propagation private -- "$PY" "$BINDIR/tn-init.py" "$n" \
    </dev/null >>"$LOGDIR/$n-init.log" 2>&1 &
  for i in $(seq 1 100); do
    upid=$(cat "$STATE/$n.unshare" 2>/dev/null || true)
    if [ -n "$upid" ] && [ -d "/proc/$upid" ]; then
      # (no /proc/PID/task/PID/children in this kernel: ask ps)
      pid=$(ps -o pid= --ppid "$upid" | tr -d ' ' | head -n1)
      if [ -n "$pid" ]; then
        echo "$pid" > "$STATE/$n.pid"
        node_pid "$n" >/dev/null && break
      fi
    fi
    sleep 0.1
  done
  pid=$(node_pid "$n") || { echo "$n: namespace did not start" >&2; return 1; }

  # Mount point for the private /srv/ganeti (the other mount points come
  # with the ganeti/openssh packages).  Created on the host only if missing,
  # and then removed again by teardown.
  if [ ! -d /srv/ganeti ]; then
    mkdir -p /srv/ganeti; touch "$TN_BASE/created-srv-ganeti"
  fi
  # Mounts, done from outside with nsenter (mount ns persists with PID 1).
  # sysfs is remounted from inside the node's netns so /sys/class/net shows
  # the node's interfaces (Ganeti checks /sys/class/net/BRIDGE/bridge).
  nsenter -t "$pid" -m -u -n -- /bin/sh -ec "
    hostname $n
    mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
    mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
    mkdir -p /run/lock /run/sshd; chmod 1777 /run/lock
    mount --bind '$d/etc-ganeti'     /etc/ganeti
    mount --bind '$d/var-lib-ganeti' /var/lib/ganeti
    mount --bind '$d/var-log-ganeti' /var/log/ganeti
    mount --bind '$d/srv-ganeti'     /srv/ganeti
    mount --bind '$d/var-cache'      /var/cache
    mount --bind '$SHARED_FS'        /srv/ganeti/shared-file-storage
    mount --bind '$d/etc-ssh'        /etc/ssh
    mount --bind '$d/root'           /root
    mount --bind '$HOSTS_FILE'       /etc/hosts
    mount --bind '$RESOLV_FILE'      /etc/resolv.conf
  "

  # Network: veth pair, host end in the host bridge, node end = eth0
  # enslaved to the node's own bridge, which carries the node IP (like a
  # real Ganeti node: NIC in a bridge, IP on the bridge).
  ip link add "tnv-$n" type veth peer name eth0 netns "$pid"
  ip link set "tnv-$n" master "$TN_HOST_BRIDGE" up
  nsenter -t "$pid" -n -- /bin/sh -ec "
    ip link set lo up
    ip link add name $TN_NODE_BRIDGE type bridge
    ip link set eth0 master $TN_NODE_BRIDGE
    ip link set eth0 up
    ip link set $TN_NODE_BRIDGE up
    ip addr add $ip/24 dev $TN_NODE_BRIDGE
  "
  # Ganeti's directories with Ganeti's owners/modes
  nx "$n" /usr/lib/ganeti/ensure-dirs
  # sshd through the init script, exactly as Ganeti will restart it later
  nx "$n" service ssh start >/dev/null
}

check_node_basics() {
  local n=$1
  nx "$n" "$PY" - "$(node_ip "$n")" <<'EOF'
import socket, sys
fqdn = socket.getfqdn()
ip = socket.getaddrinfo(fqdn, None, socket.AF_INET)[0][4][0]
print("  hostname", socket.gethostname(), "fqdn", fqdn, "ip", ip)
sys.exit(0 if ip == sys.argv[1] else 1)
EOF
}

init_cluster() {
  step "gnt-cluster init $CLUSTER_NAME on $MASTER"
  # --no-etc-hosts: /etc/hosts is a bind-mounted file (Ganeti's rename-into-
  #   place update would fail with EBUSY) and already lists all names.
  # SSH setup is left ON (modify_ssh_setup=True, as on a real cluster):
  #   Ganeti generates root's key pair and later distributes keys/host keys.
  # relaxed ipolicy so small test disks (e.g. 64M) are accepted.
  gnt gnt-cluster init \
    --enabled-hypervisors=fake \
    --enabled-disk-templates="$TN_TEMPLATES" \
    --ipolicy-disk-templates="$TN_TEMPLATES" \
    --file-storage-dir=/srv/ganeti/file-storage \
    --shared-file-storage-dir=/srv/ganeti/shared-file-storage \
    --master-netdev="$TN_NODE_BRIDGE" \
    --nic-parameters="mode=bridged,link=$TN_NODE_BRIDGE" \
    --ipolicy-bounds-specs='min:cpu-count=1,disk-count=1,disk-size=4,memory-size=32,nic-count=0,spindle-use=0/max:cpu-count=8,disk-count=16,disk-size=1048576,memory-size=32768,nic-count=8,spindle-use=12' \
    --no-etc-hosts \
    "$CLUSTER_NAME" </dev/null
}

add_node2() {
  local n=node2
  step "gnt-node add $(node_fqdn $n)"
  # The first SSH login of `gnt-node add` (prepare-node-join) is where an
  # admin would type node2's root password.  Pre-authorise the master's root
  # key instead (Ganeti itself then rewrites authorized_keys).
  cat "$NODEDIR/$MASTER/root/.ssh/"id_*.pub >> "$NODEDIR/$n/root/.ssh/authorized_keys"
  chmod 600 "$NODEDIR/$n/root/.ssh/authorized_keys"
  # --no-ssh-key-check: node2's own host key is unknown to the cluster's
  #   known_hosts, and there is no TTY to answer ssh's "continue (yes/no)?".
  gnt gnt-node add --no-ssh-key-check "$(node_fqdn $n)" </dev/null
}

cluster_healthy() {
  local n
  for n in "${NODES[@]}"; do node_pid "$n" >/dev/null || return 1; done
  [ "$(gnt gnt-node list --no-headers -o name 2>/dev/null | wc -l)" = 2 ]
}

setup() {
  local t0 t1 t2 t3 t4
  if cluster_healthy; then
    echo "two-node cluster already running:"; gnt gnt-node list; return 0
  fi
  # anything left from a partial run goes first (no-op if nothing is there)
  teardown
  t0=$(ts)
  require_packages
  t1=$(ts)
  write_helpers
  host_network
  for n in "${NODES[@]}"; do prepare_node_dirs "$n"; start_node "$n"; done
  for n in "${NODES[@]}"; do check_node_basics "$n"; done
  nx node1 fping -q -c1 -t2000 "$(node_ip node2)"   # L2 path node1 -> host bridge -> node2
  t2=$(ts)
  init_cluster
  t3=$(ts)
  add_node2
  t4=$(ts)
  step "gnt-node list / gnt-cluster verify -I ENODESETUP"
  gnt gnt-node list
  # -I ENODESETUP: downgrade the /proc/sysrq-trigger error (kernel without
  # CONFIG_MAGIC_SYSRQ) to a warning; anything else fails the setup.
  gnt gnt-cluster verify -I ENODESETUP
  awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v e="$t4" -v f="$(ts)" 'BEGIN {
    printf "TIMING checks=%.1fs nodes=%.1fs cluster-init=%.1fs node-add=%.1fs verify=%.1fs total=%.1fs\n",
      b-a, c-b, d-c, e-d, f-e, f-a }'
}

# ------------------------------------------------------------------ teardown

teardown() {
  local n pid upid i
  step "teardown"
  # 1. Ganeti-level cleanup through the master (best effort, bounded time)
  if node_pid "$MASTER" >/dev/null &&
     [ -s "$NODEDIR/$MASTER/var-lib-ganeti/config.data" ]; then
    for i in $(NX_TIMEOUT=60 gnt gnt-instance list --no-headers -o name 2>/dev/null); do
      echo "removing instance $i"
      NX_TIMEOUT=300 gnt gnt-instance remove -f "$i" </dev/null ||
        NX_TIMEOUT=300 gnt gnt-instance remove -f --ignore-failures "$i" </dev/null ||
        echo "WARN: remove $i failed"
    done
    for i in $(NX_TIMEOUT=60 gnt gnt-backup list --no-headers -o export 2>/dev/null | grep -vx '?' | sort -u); do
      echo "removing export $i"
      NX_TIMEOUT=120 gnt gnt-backup remove "$i" </dev/null || true
    done
    for n in "${NODES[@]}"; do
      [ "$n" = "$MASTER" ] && continue
      if NX_TIMEOUT=60 gnt gnt-node list --no-headers -o name 2>/dev/null | grep -qx "$(node_fqdn "$n")"; then
        echo "gnt-node remove $(node_fqdn "$n")"
        NX_TIMEOUT=300 gnt gnt-node remove "$(node_fqdn "$n")" </dev/null || echo "WARN: node remove $n failed"
      fi
    done
    echo "gnt-cluster destroy"
    NX_TIMEOUT=300 gnt gnt-cluster destroy --yes-do-it </dev/null || echo "WARN: cluster destroy failed"
  fi
  # 2. stop daemons politely, then end each node by killing its PID 1 (by
  #    pid, from the host): the kernel kills all remaining processes of the
  #    PID namespace; mount and net namespaces (and the veth pair) vanish
  #    with their last process.
  for n in "${NODES[@]}"; do
    pid=$(node_pid "$n") || continue
    echo "stopping $n (PID 1 = host pid $pid)"
    NX_TIMEOUT=120 nx "$n" /usr/lib/ganeti/daemon-util stop-all >/dev/null 2>&1 || true
    NX_TIMEOUT=30 nx "$n" service ssh stop >/dev/null 2>&1 || true
    kill -TERM "$pid" 2>/dev/null || true
    upid=$(cat "$STATE/$n.unshare" 2>/dev/null || true)
    for i in $(seq 1 100); do
      [ -d "/proc/$pid" ] || { [ -n "$upid" ] && [ -d "/proc/$upid" ]; } || break
      sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  rm -f "$STATE"/*.pid "$STATE"/*.unshare 2>/dev/null || true
  # 3. links (veths normally died with the netns) and the host bridge
  for n in "${NODES[@]}"; do
    if ip link show "tnv-$n" >/dev/null 2>&1; then ip link del "tnv-$n"; fi
  done
  if ip link show "$TN_HOST_BRIDGE" >/dev/null 2>&1; then ip link del "$TN_HOST_BRIDGE"; fi
  # 4. node state (logs under $LOGDIR are kept)
  rm -rf "$NODEDIR" "$SHARED_FS" "$STATE"
  if [ -e "$TN_BASE/created-srv-ganeti" ]; then
    rmdir /srv/ganeti 2>/dev/null || true; rm -f "$TN_BASE/created-srv-ganeti"
  fi
  return 0
}

status() {
  local n pid
  for n in "${NODES[@]}"; do
    if pid=$(node_pid "$n"); then
      echo "== $n: PID1 host pid $pid"
      nx "$n" ps -eo pid,user,args --sort=pid | sed 's/^/   /'
      nx "$n" ip -br addr | sed 's/^/   /'
    else
      echo "== $n: not running"
    fi
  done
  if node_pid "$MASTER" >/dev/null; then gnt gnt-node list || true; fi
}

# ---------------------------------------------------------------------- main

case "${1:-}" in
  setup) setup ;;
  teardown) teardown ;;
  status) status ;;
  exec) shift; [ $# -ge 2 ] || { echo "usage: $0 exec NODE CMD..." >&2; exit 2; }; nx "$@" ;;
  gnt) shift; gnt "$@" ;;
  verify) gnt gnt-cluster verify -I ENODESETUP ;;
  *) echo "usage: $0 setup|teardown|status|verify|exec NODE CMD...|gnt CMD..." >&2; exit 2 ;;
esac
