#!/bin/bash
# cluster.sh -- a throwaway single-node Ganeti 3.0 cluster for the provider's tests.
#
# Adapted from a tested single-node cluster recipe (verified on Debian 12, ganeti 3.0.2,
# as root, without systemd and without device-mapper).  No apt here: .ci/setup installs ganeti.
# tests/ganeti/conftest.py runs "setup" once per test session and "teardown" at its end, also
# when tests fail; both are idempotent, and teardown undoes everything setup did.
#
# Usage: cluster.sh setup | teardown | status
#
# Everything network-related stays on a private, port-less Linux bridge (gntbr0) in TEST-NET-2
# (198.51.100.0/24): the node IP, the cluster (master) IP and the bridge of instance NICs, so
# master-ip-setup's fping/arping never leave the machine.
#
# Tunables (environment): GNT_NET (198.51.100), GNT_BRIDGE (gntbr0), GNT_DOMAIN (example.test),
# GNT_TEMPLATES (file,blockdev,ext).
set -euo pipefail

GNT_NET=${GNT_NET:-198.51.100}
GNT_BRIDGE=${GNT_BRIDGE:-gntbr0}
GNT_DOMAIN=${GNT_DOMAIN:-example.test}
GNT_TEMPLATES=${GNT_TEMPLATES:-file,blockdev,ext}

HOST_SHORT=$(hostname -s)
NODE_IP=$GNT_NET.1
CLUSTER_IP=$GNT_NET.10
NODE_FQDN=$HOST_SHORT.$GNT_DOMAIN
CLUSTER_NAME=cluster.$GNT_DOMAIN
HOSTS_BACKUP=/etc/hosts.pre-ganeti-test
FSP=/etc/ganeti/file-storage-paths
FSP_BACKUP=$FSP.pre-ganeti-test
FILE_STORAGE_DIR=/srv/ganeti/file-storage
LOOP_IMG_DIR=/srv/ganeti/loop-images
ES_DIR=/srv/ganeti/extstorage/loopfile
NBD_ES_DIR=/srv/ganeti/extstorage/nbdfile
NBD_IMG_DIR=/srv/ganeti/nbd-images
NBD_RUN_DIR=/run/ganeti-test-nbd
# Marks what this script created, so that teardown removes only that.
STATE_DIR=/var/lib/ganeti-test-cluster
KVM_STUB=$STATE_DIR/kvm

# Ganeti commands run with a clean environment: the daemons started by "gnt-cluster init"
# inherit it, and the OS import/export scripts inherit the daemons' environment (pitfall 3).
gnt() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

step() { echo "=== $(date +%T) $*"; }

setup_network() {
  step "private bridge $GNT_BRIDGE with $NODE_IP/24"
  if ! ip link show "$GNT_BRIDGE" >/dev/null 2>&1; then
    ip link add name "$GNT_BRIDGE" type bridge
    touch "$STATE_DIR/bridge"
  fi
  ip link set "$GNT_BRIDGE" up
  ip -4 addr show dev "$GNT_BRIDGE" | grep -q " $NODE_IP/" ||
    ip addr add "$NODE_IP/24" dev "$GNT_BRIDGE"
}

setup_hosts() {
  step "/etc/hosts: $NODE_FQDN -> $NODE_IP (must not resolve to loopback)"
  [ -e "$HOSTS_BACKUP" ] || cp -a /etc/hosts "$HOSTS_BACKUP"
  # Drop the host name from loopback lines: with "multi on" in /etc/host.conf getaddrinfo
  # returns every address and Ganeti takes the first (pitfall 1).
  awk -v h="$HOST_SHORT" -v f="$NODE_FQDN" '
    $1 ~ /^(127\.|::1$)/ { out=$1; for (i=2;i<=NF;i++) if ($i!=h && $i!=f) out=out" "$i;
                           if (out!=$1) print out; next }
    { print }' "$HOSTS_BACKUP" > /etc/hosts.new
  {
    echo "$NODE_IP $NODE_FQDN $HOST_SHORT"
    echo "$CLUSTER_IP $CLUSTER_NAME"
    for i in $(seq 1 9); do echo "$GNT_NET.$((20+i)) inst$i.$GNT_DOMAIN"; done
    cat /etc/hosts.new
  } > /etc/hosts
  rm -f /etc/hosts.new
  # What Ganeti's netutils.GetHostname() does, with Ganeti's own interpreter.
  /usr/bin/python3 - "$NODE_IP" <<'EOF'
import socket, sys
fqdn = socket.getfqdn()
ip = socket.getaddrinfo(fqdn, None, socket.AF_INET)[0][4][0]
print("hostname", socket.gethostname(), "fqdn", fqdn, "ip", ip)
sys.exit(0 if ip == sys.argv[1] else 1)
EOF
}

setup_dirs() {
  step "storage dirs"
  mkdir -p "$FILE_STORAGE_DIR" /srv/ganeti/os "$LOOP_IMG_DIR" /var/log/ganeti/extstorage
  # The file disk template's directory must be whitelisted.
  if [ ! -e "$FSP_BACKUP" ] && [ ! -e "$STATE_DIR/fsp-absent" ]; then
    if [ -e "$FSP" ]; then cp -a "$FSP" "$FSP_BACKUP"; else touch "$STATE_DIR/fsp-absent"; fi
  fi
  grep -qxF "$FILE_STORAGE_DIR" "$FSP" 2>/dev/null || echo "$FILE_STORAGE_DIR" >> "$FSP"
}

# A minimal ExtStorage provider backing each disk with a sparse file on a loop device, so that
# OS scripts get a real block device (DISK_0_PATH=/dev/loopN) without LVM/device-mapper.
# Use: -t ext --disk 0:size=256M,provider=loopfile
install_loopfile_extstorage() {
  step "ExtStorage provider 'loopfile' in $ES_DIR"
  mkdir -p "$ES_DIR"
  : > "$ES_DIR/parameters.list"
  cat > "$ES_DIR/common.sh" <<EOF
IMGDIR=$LOOP_IMG_DIR
EOF
  cat >> "$ES_DIR/common.sh" <<'EOF'
IMG="$IMGDIR/$VOL_NAME.img"
find_loop() { losetup -j "$IMG" -O NAME -n | head -n1; }
EOF
  cat > "$ES_DIR/create" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
mkdir -p "$IMGDIR"; truncate -s "${VOL_SIZE}M" "$IMG"
EOF
  # No -P: partition scanning is useless without udev and slows attach down.
  cat > "$ES_DIR/attach" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
dev=$(find_loop); [ -n "$dev" ] || dev=$(losetup -f --show "$IMG"); echo "$dev"
EOF
  cat > "$ES_DIR/detach" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
dev=$(find_loop); [ -z "$dev" ] || losetup -d "$dev"
EOF
  cat > "$ES_DIR/remove" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
dev=$(find_loop); [ -z "$dev" ] || losetup -d "$dev"; rm -f "$IMG"
EOF
  cat > "$ES_DIR/grow" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
truncate -s "${VOL_NEW_SIZE}M" "$IMG"; dev=$(find_loop); [ -z "$dev" ] || losetup -c "$dev"
EOF
  printf '#!/bin/sh\nexit 0\n' > "$ES_DIR/setinfo"
  printf '#!/bin/sh\nexit 0\n' > "$ES_DIR/verify"
  chmod 755 "$ES_DIR"/{create,attach,detach,remove,grow,setinfo,verify}
}

# An ExtStorage provider whose volumes have NO kernel block device: each disk is a sparse file
# served by qemu-nbd on a unix socket, and attach prints an empty first line (no device) and the
# URI kvm would open.  With the disk parameter access=userspace (kvm only), Ganeti passes the OS
# scripts DISK_0_URI=nbd+unix:///disk?socket=... and no DISK_0_PATH, as for rbd or gluster.
# Use: -H kvm -t ext --disk 0:size=256M,provider=nbdfile,access=userspace
install_nbdfile_extstorage() {
  step "ExtStorage provider 'nbdfile' in $NBD_ES_DIR"
  mkdir -p "$NBD_ES_DIR"
  : > "$NBD_ES_DIR/parameters.list"
  cat > "$NBD_ES_DIR/common.sh" <<EOF
IMGDIR=$NBD_IMG_DIR
RUNDIR=$NBD_RUN_DIR
EOF
  cat >> "$NBD_ES_DIR/common.sh" <<'EOF'
IMG="$IMGDIR/$VOL_NAME.img"
SOCK="$RUNDIR/$VOL_NAME.sock"
PIDFILE="$RUNDIR/$VOL_NAME.pid"
LOG="/var/log/ganeti/extstorage/nbdfile-$VOL_NAME.log"
# The pid of this volume's qemu-nbd, if it runs (checked against its command line: pids recycle).
server_pid() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "--socket=$SOCK" &&
    echo "$pid"
}
stop_server() {
  local pid i
  if pid=$(server_pid); then
    kill "$pid"
    for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  fi
  rm -f "$PIDFILE" "$SOCK"
}
EOF
  cat > "$NBD_ES_DIR/create" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
mkdir -p "$IMGDIR"; truncate -s "${VOL_SIZE}M" "$IMG"
EOF
  # Ganeti attaches again whenever it looks a disk up: a running server is reused.  --persistent
  # keeps serving after a client leaves; --fork returns once the socket listens.  The server's
  # output goes to a log, never to Ganeti's pipe, which would otherwise stay open.
  cat > "$NBD_ES_DIR/attach" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
[ -f "$IMG" ] || { echo "no volume $IMG" >&2; exit 1; }
if ! server_pid >/dev/null; then
  mkdir -p "$RUNDIR"; rm -f "$PIDFILE" "$SOCK"
  qemu-nbd --fork --persistent --shared=8 --format=raw --discard=unmap --export-name=disk \
    --socket="$SOCK" --pid-file="$PIDFILE" "$IMG" </dev/null >>"$LOG" 2>&1
fi
echo
echo "kvm:nbd+unix:///disk?socket=$SOCK"
EOF
  cat > "$NBD_ES_DIR/detach" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
stop_server
EOF
  cat > "$NBD_ES_DIR/remove" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
stop_server; rm -f "$IMG"
EOF
  # A running server keeps the old size until the next attach.
  cat > "$NBD_ES_DIR/grow" <<'EOF'
#!/bin/bash
set -e; . "$(dirname "$0")/common.sh"
truncate -s "${VOL_NEW_SIZE}M" "$IMG"
EOF
  printf '#!/bin/sh\nexit 0\n' > "$NBD_ES_DIR/setinfo"
  printf '#!/bin/sh\nexit 0\n' > "$NBD_ES_DIR/verify"
  chmod 755 "$NBD_ES_DIR"/{create,attach,detach,remove,grow,setinfo,verify}
}

# Ganeti allows access=userspace only with the kvm hypervisor, and validates kvm's parameters by
# running "<kvm_path> --help" and "<kvm_path> -machine ?".  The tests never start an instance, so
# a stand-in answering those two is enough (no qemu-system-x86); tests/ganeti/test_uri_disks.py
# enables kvm with kvm_path pointing here for its own instances only.
install_kvm_stub() {
  step "kvm stand-in $KVM_STUB"
  cat > "$KVM_STUB" <<'EOF'
#!/bin/sh
# Stand-in for kvm on the Ganeti test cluster: answers Ganeti's parameter checks, runs no VM.
case "$*" in
  --help) echo "QEMU emulator version 7.2.0 (Ganeti test stand-in)"; exit 0 ;;
  "-machine ?") printf 'Supported machines are:\npc  Standard PC (default)\n'; exit 0 ;;
esac
echo "kvm stand-in: the Ganeti test cluster does not start instances" >&2
exit 1
EOF
  chmod 755 "$KVM_STUB"
}

init_cluster() {
  step "gnt-cluster init $CLUSTER_NAME"
  # --no-ssh-init: single node, no sshd needed; --no-etc-hosts: /etc/hosts is ours.
  # Only file/blockdev/ext: no LVM or DRBD without device-mapper.  The relaxed ipolicy accepts
  # small test disks (the default minimum is 1 GiB, pitfall 4).
  gnt gnt-cluster init \
    --enabled-hypervisors=fake \
    --enabled-disk-templates="$GNT_TEMPLATES" \
    --ipolicy-disk-templates="$GNT_TEMPLATES" \
    --file-storage-dir="$FILE_STORAGE_DIR" \
    --master-netdev="$GNT_BRIDGE" \
    --nic-parameters="mode=bridged,link=$GNT_BRIDGE" \
    --ipolicy-bounds-specs='min:cpu-count=1,disk-count=1,disk-size=4,memory-size=32,nic-count=0,spindle-use=0/max:cpu-count=8,disk-count=16,disk-size=1048576,memory-size=32768,nic-count=8,spindle-use=12' \
    --no-etc-hosts --no-ssh-init \
    "$CLUSTER_NAME"
  touch "$STATE_DIR/cluster"
  gnt gnt-cluster info | grep -E 'Cluster name|Master node|enabled disk templates|OS search path' || true
}

# True when this machine belongs to a Ganeti cluster (any node has ssconf files).
in_a_cluster() {
  [ -s /var/lib/ganeti/config.data ] || compgen -G '/var/lib/ganeti/ssconf_*' >/dev/null
}

setup() {
  if in_a_cluster; then
    echo "this machine already belongs to a Ganeti cluster; refusing to touch it" >&2
    exit 1
  fi
  mkdir -p "$STATE_DIR"
  setup_network
  setup_hosts
  setup_dirs
  install_loopfile_extstorage
  install_nbdfile_extstorage
  install_kvm_stub
  init_cluster
  step "cluster ready"
}

teardown() {
  step "teardown"
  if in_a_cluster; then
    if [ ! -e "$STATE_DIR/cluster" ]; then
      echo "the configured Ganeti cluster was not made by this script; leaving it alone" >&2
      exit 1
    fi
    for i in $(gnt gnt-instance list --no-headers -o name 2>/dev/null); do
      gnt gnt-instance remove -f --ignore-failures "$i" || echo "WARN: remove $i failed"
    done
    for e in $(gnt gnt-backup list --no-headers -o export 2>/dev/null); do
      gnt gnt-backup remove "$e" || echo "WARN: remove export $e failed"
    done
    gnt gnt-cluster destroy --yes-do-it || echo "WARN: cluster destroy failed"
  fi
  # destroy leaves the on-demand ganeti-metad running (pitfall 13); stop everything left.
  gnt /usr/lib/ganeti/daemon-util stop-all || true
  # Loop devices of the 'loopfile' ExtStorage provider, if any are left.
  for img in "$LOOP_IMG_DIR"/*.img; do
    [ -e "$img" ] || continue
    for d in $(losetup -j "$img" -O NAME -n); do losetup -d "$d" || true; done
    rm -f "$img"
  done
  rm -rf "$ES_DIR"
  # Servers and volumes of the 'nbdfile' ExtStorage provider, if any are left.
  for pidfile in "$NBD_RUN_DIR"/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "^--socket=$NBD_RUN_DIR/"; then
      kill "$pid" || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  rm -rf "$NBD_RUN_DIR" "$NBD_IMG_DIR" "$NBD_ES_DIR"
  if [ -e "$STATE_DIR/bridge" ]; then
    ip link show "$GNT_BRIDGE" >/dev/null 2>&1 && ip link del "$GNT_BRIDGE"
    rm -f "$STATE_DIR/bridge"
  fi
  if [ -e "$HOSTS_BACKUP" ]; then cp -a "$HOSTS_BACKUP" /etc/hosts && rm -f "$HOSTS_BACKUP"; fi
  if [ -e "$FSP_BACKUP" ]; then mv -f "$FSP_BACKUP" "$FSP"; fi
  if [ -e "$STATE_DIR/fsp-absent" ]; then rm -f "$FSP"; fi
  rm -rf "$STATE_DIR"
  step "teardown done"
}

status() {
  # Exit 0 when this script's cluster is up, 1 when no cluster, 2 when a foreign one exists.
  in_a_cluster || exit 1
  [ -e "$STATE_DIR/cluster" ] && exit 0
  exit 2
}

case "${1:-}" in
  setup) setup ;;
  teardown) teardown ;;
  status) status ;;
  *) echo "usage: $0 setup|teardown|status" >&2; exit 2 ;;
esac
