#!/usr/bin/env bash
# Start a real multi-host Slurm cluster on this one machine, for the `multinode` tests and for
# trying multi-node runs by hand. Debian 12 (Slurm 22.05), run as root, no systemd needed.
#
#   tests/cluster/start_cluster.sh [N]     # N hosts (default 2, at most 4); waits until all idle
#   export SLURM_CONF=/tmp/smoothap-cluster/etc/slurm.conf   # printed at the end
#   srun -N2 --ntasks-per-node=2 hostname
#   tests/cluster/stop_cluster.sh          # removes everything this script made
#
# Each host is a network namespace sapnodeI (I = 1..N) with `lo`, one veth into the bridge
# sapbr0, the address 10.213.0.(10+I)/24, a line in /etc/hosts, and one slurmd running in its
# own UTS namespace with hostname sapnodeI. The head is the machine itself: the bridge address
# 10.213.0.1 carries slurmctld and slurmdbd (with a private MariaDB on 127.0.0.1). No route
# leaves the subnet (no default route, no forwarding): hosts reach each other and the head only.
# The machine's disk is the shared filesystem, so a job sees the same paths on every host.
#
# Why not `ip netns exec`: it remounts /sys for the namespace, and slurmd then fails with
# "No filesystem mounted on /sys/fs/cgroup"; nsenter joins the network namespace only.
# Why a UTS namespace per host: gloo advertises the address the process's hostname resolves
# to; with the machine's own name every rank would advertise 127.0.0.1 and peers on other
# hosts would be refused.
#
# Everything lives in $SMOOTHAP_CLUSTER_DIR (default /tmp/smoothap-cluster), with its own
# ports, munge and MariaDB, so it runs beside tests/slurm's one-host cluster. Running it again
# is harmless: what exists is kept, only what is missing is created or started. Asking for a
# different N than the running cluster has is an error (stop it first).
set -euo pipefail

N=${1:-2}
DIR=${SMOOTHAP_CLUSTER_DIR:-/tmp/smoothap-cluster}
# The first three octets of the private subnet; .1 is the head, .11.. the hosts.
NET=${SMOOTHAP_CLUSTER_NET:-10.213.0}
CTLD_PORT=${SMOOTHAP_CLUSTER_SLURMCTLD_PORT:-16827}
SLURMD_PORT=${SMOOTHAP_CLUSTER_SLURMD_PORT:-16828}
DBD_PORT=${SMOOTHAP_CLUSTER_SLURMDBD_PORT:-16829}
DB_PORT=${SMOOTHAP_CLUSTER_MARIADB_PORT:-16316}
CRED_EXPIRE=${SMOOTHAP_SLURM_CRED_EXPIRE:-10}
CLUSTER=smoothapnet
PARTITION=debug
DB_USER=slurm
DB_PASS=slurm-cluster-test
BRIDGE=sapbr0
PREFIX=sapnode
HEAD_ADDR=$NET.1
# Marks the /etc/hosts lines this script adds; the stop script removes exactly those.
HOSTS_MARK="# smoothap-test-cluster"

ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log STATE=$DIR/state
MUNGE_DIR=$DIR/munge DB_DIR=$DIR/mariadb
export SLURM_CONF=$ETC/slurm.conf

TAG=start_cluster
# shellcheck source=tests/slurm/common.sh
. "$(dirname "$0")/../slurm/common.sh"

case "$N" in 1 | 2 | 3 | 4) ;; *) die "hosts N=$N: must be 1 to 4 (the machine time-shares its cores between hosts); run start_cluster.sh 2" ;; esac
require_root
install_packages
command -v nsenter >/dev/null && command -v unshare >/dev/null && command -v ip >/dev/null \
    || die "nsenter, unshare and ip are needed (packages util-linux, iproute2)"

host_name() { echo "$PREFIX$1"; }
host_addr() { echo "$NET.$((10 + $1))"; }

if [ -s "$DIR/hosts" ] && [ "$(wc -l <"$DIR/hosts")" != "$N" ] && alive slurmctld "$RUN/slurmctld.pid"; then
    die "a cluster of $(wc -l <"$DIR/hosts") hosts is running ($DIR/hosts); run tests/cluster/stop_cluster.sh before starting $N"
fi

# ------------------------------------------------------------------ network
# The subnet must be ours alone: refuse when an interface other than the bridge holds an
# address in it (a real network would then be shadowed by the test hosts).
other=$(ip -o -4 addr show | awk -v net="$NET." -v br="$BRIDGE" '$2 != br && index($4, net) == 1 {print $2 " " $4}')
[ -z "$other" ] || die "subnet $NET.0/24 is already used on this machine ($other); set SMOOTHAP_CLUSTER_NET to a free 10.x.y prefix"

if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    say "created bridge $BRIDGE"
fi
ip addr replace "$HEAD_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up

mkdir -p "$DIR"
: >"$DIR/hosts.new"
for i in $(seq "$N"); do
    h=$(host_name "$i") addr=$(host_addr "$i") veth=sapv$i
    [ -e "/var/run/netns/$h" ] || { ip netns add "$h"; say "created network namespace $h"; }
    if ! ip link show "$veth" >/dev/null 2>&1; then
        # The peer is created directly inside the namespace, named eth0 there.
        ip link add "$veth" type veth peer name eth0 netns "$h"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$h" link set lo up
    ip -n "$h" addr replace "$addr/24" dev eth0
    ip -n "$h" link set eth0 up
    echo "$h $addr" >>"$DIR/hosts.new"
done
mv "$DIR/hosts.new" "$DIR/hosts"

# /etc/hosts is shared by all namespaces (one mount namespace): every host and the head
# resolve every host's name. Rewritten in place (cat >), since it may be a bind mount.
{
    grep -vF "$HOSTS_MARK" /etc/hosts || true
    while read -r h addr; do echo "$addr $h $HOSTS_MARK"; done <"$DIR/hosts"
} >"$DIR/etc-hosts.new"
cmp -s "$DIR/etc-hosts.new" /etc/hosts || cat "$DIR/etc-hosts.new" >/etc/hosts
rm -f "$DIR/etc-hosts.new"

say "network up: bridge $BRIDGE $HEAD_ADDR/24, hosts $(cut -d' ' -f1 "$DIR/hosts" | tr '\n' ' ')"

# ------------------------------------------------------------------ configuration
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$MUNGE_DIR" "$DB_DIR"
chmod 755 "$DIR" "$ETC" "$RUN" "$LOG"
for i in $(seq "$N"); do mkdir -p "$STATE/slurmd/$(host_name "$i")"; done

# The hosts share the machine's cores and memory: each declares them all (slurmd refuses to
# run with less than it is configured for), minus 512 MB for the OS.
cpus=$(nproc)
real_mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
real_mem=$((real_mem > 1024 ? real_mem - 512 : real_mem))
node_list="$(host_name 1)"
[ "$N" -gt 1 ] && node_list="$PREFIX[1-$N]"

{
    cat <<EOF
# Written by tests/cluster/start_cluster.sh: $N hosts in network namespaces on one machine.
ClusterName=$CLUSTER
# The controller runs on this machine (the head), reached by every host at the bridge address.
SlurmctldHost=$(hostname -s)($HEAD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$STATE/ctld
# %n: one spool, pid file and log per host, since all slurmd share this filesystem.
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
EOF
    # slurmdbd on the bridge address too: jobs on the hosts may call sacct.
    slurm_conf_common "$MUNGE_DIR" "$CRED_EXPIRE" "$HEAD_ADDR" "$DBD_PORT"
    while read -r h addr; do
        echo "NodeName=$h NodeAddr=$addr CPUs=$cpus RealMemory=$real_mem State=UNKNOWN"
    done <"$DIR/hosts"
    echo "PartitionName=$PARTITION Nodes=$node_list Default=YES MaxTime=INFINITE State=UP"
} >"$ETC/slurm.conf.new"
conf_changed=0
cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf" || conf_changed=1
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
write_slurmdbd_conf "$ETC/slurmdbd.conf" "$MUNGE_DIR" "$HEAD_ADDR" "$DBD_PORT" "$RUN" "$LOG" \
    "$DB_PORT" "$DB_USER" "$DB_PASS"
: >"$ETC/plugstack.conf"

# ------------------------------------------------------------------ daemons
start_munge "$MUNGE_DIR"
start_mariadb "$DB_DIR" "$LOG" "$DB_PORT" "$DB_USER" "$DB_PASS"
start_slurmdbd "$RUN" "$LOG" "$CLUSTER"
start_slurmctld "$RUN" "$LOG" "$conf_changed"

while read -r h addr; do
    if alive slurmd "$RUN/slurmd-$h.pid"; then
        say "slurmd on $h already running"
        continue
    fi
    # slurmd daemonizes; its UTS namespace lives as long as it (and its job steps) do.
    nsenter --net="/var/run/netns/$h" unshare --uts \
        sh -c "hostname $h && exec slurmd -f '$SLURM_CONF' -N $h" \
        || { show_log "$LOG/slurmd-$h.log"; die "slurmd on $h did not start (log above)"; }
done <"$DIR/hosts"

while read -r h addr; do
    wait_for 60 "host $h ($addr) is up" node_ready "$h" || {
        show_log "$LOG/slurmd-$h.log"; show_log "$LOG/slurmctld.log"
        die "host $h did not become idle: $(sinfo -h -n "$h" -o '%T %E' 2>&1)"
    }
done <"$DIR/hosts"
wait_accounting "$LOG"

echo "export SLURM_CONF=$SLURM_CONF"
