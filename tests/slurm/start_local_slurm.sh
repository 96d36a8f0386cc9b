#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this host, for the `slurm` tests and for trying the
# launcher by hand. Debian 12 (Slurm 22.05), run as root, no systemd needed.
#
#   tests/slurm/start_local_slurm.sh          # installs packages if missing, starts, waits idle
#   export SLURM_CONF=/tmp/smoothap-slurm/etc/slurm.conf   # printed at the end
#   tests/slurm/stop_local_slurm.sh           # cancels jobs, stops what this script started
#
# Everything lives in $SMOOTHAP_SLURM_DIR (default /tmp/smoothap-slurm): configs, state, logs,
# pid files, a private munge socket and key, and a private MariaDB (data directory, socket,
# port) for slurmdbd. Nothing under /etc is written except, when this host's short name does
# not resolve, one "127.0.0.1 <name>" line in /etc/hosts (submitit's TorchDistributedEnvironment
# uses the node name as MASTER_ADDR, so it must resolve).
#
# Why accounting: submitit reads job states with `sacct`; without slurmdbd it fails, states stay
# UNKNOWN and cancelled or timed-out jobs are never seen as done (tests would hang).
#
# Running it again on a running cluster is harmless: a daemon whose recorded pid is alive is
# left alone; only missing daemons are started.
set -euo pipefail

DIR=${SMOOTHAP_SLURM_DIR:-/tmp/smoothap-slurm}
# Private ports, so a system Slurm or MariaDB on the default ports is never touched.
CTLD_PORT=${SMOOTHAP_SLURMCTLD_PORT:-16817}
SLURMD_PORT=${SMOOTHAP_SLURMD_PORT:-16818}
DBD_PORT=${SMOOTHAP_SLURMDBD_PORT:-16819}
DB_PORT=${SMOOTHAP_MARIADB_PORT:-16306}
# A requeued job is held for cred_expire seconds before it may start again (default 120).
CRED_EXPIRE=${SMOOTHAP_SLURM_CRED_EXPIRE:-10}
CLUSTER=smoothap
PARTITION=debug
DB_USER=slurm
DB_PASS=slurm-local-test

ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log STATE=$DIR/state
MUNGE_DIR=$DIR/munge DB_DIR=$DIR/mariadb
export SLURM_CONF=$ETC/slurm.conf

TAG=start_local_slurm
# shellcheck source=tests/slurm/common.sh
. "$(dirname "$0")/common.sh"

require_root
install_packages

HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
    say "adding '127.0.0.1 $HOST' to /etc/hosts (the node name must resolve: it is MASTER_ADDR)"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi

mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/slurmd" "$MUNGE_DIR" "$DB_DIR"
chmod 755 "$DIR" "$ETC" "$RUN" "$LOG"

# ------------------------------------------------------------------ configuration
# The hardware line from slurmd itself (CPUs, sockets, cores, memory); keep 512 MB for the OS.
node_hw=$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //')
real_mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_hw")
node_hw=$(sed -e "s/RealMemory=[0-9]*/RealMemory=$((real_mem > 1024 ? real_mem - 512 : real_mem))/" <<<"$node_hw")

cat >"$ETC/slurm.conf.new" <<EOF
# Written by tests/slurm/start_local_slurm.sh: a one-node test cluster.
ClusterName=$CLUSTER
# The controller host must be the real short hostname; it listens on loopback.
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
$(slurm_conf_common "$MUNGE_DIR" "$CRED_EXPIRE" 127.0.0.1 "$DBD_PORT")
NodeName=$HOST NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf" || conf_changed=1
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"

write_slurmdbd_conf "$ETC/slurmdbd.conf" "$MUNGE_DIR" 127.0.0.1 "$DBD_PORT" "$RUN" "$LOG" \
    "$DB_PORT" "$DB_USER" "$DB_PASS"

# Empty cgroup/plugstack configs so nothing is read from /etc/slurm.
: >"$ETC/plugstack.conf"

start_munge "$MUNGE_DIR"
start_mariadb "$DB_DIR" "$LOG" "$DB_PORT" "$DB_USER" "$DB_PASS"
start_slurmdbd "$RUN" "$LOG" "$CLUSTER"
start_slurmctld "$RUN" "$LOG" "$conf_changed"
if alive slurmd "$RUN/slurmd.pid"; then
    say "slurmd already running"
else
    slurmd -f "$SLURM_CONF" || { show_log "$LOG/slurmd.log"; die "slurmd did not start"; }
fi

wait_for 60 "node $HOST is up (partition $PARTITION)" node_ready "$HOST" || {
    show_log "$LOG/slurmd.log"; show_log "$LOG/slurmctld.log"
    die "node $HOST did not become idle: $(sinfo -h -n "$HOST" -o '%T %E' 2>&1)"
}
wait_accounting "$LOG"

echo "export SLURM_CONF=$SLURM_CONF"
