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

say() { echo "[start_local_slurm] $*"; }
die() { echo "[start_local_slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it starts slurmctld/slurmd as root and may apt-get install); re-run with sudo"

# ------------------------------------------------------------------ packages
need_pkgs=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge \
            slurmdbd:slurmdbd mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    say "installing ${need_pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # No service may start from a package's postinst: this script starts its own daemons.
    policy_created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    apt_ok=0
    for attempt in 1 2 3; do
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client >/dev/null; then
            apt_ok=1; break
        fi
        say "apt-get failed (attempt $attempt), retrying in 5 s"; sleep 5
    done
    [ $policy_created = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $apt_ok = 1 ] || die "apt-get install of ${need_pkgs[*]} failed; check network access to the Debian mirror"
fi

# ------------------------------------------------------------------ helpers
# alive NAME PIDFILE: the recorded pid exists and is the expected program (pids get reused).
alive() {
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s.
wait_for() {
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
    say "$what"
}

show_log() { [ -f "$1" ] && tail -n 30 "$1" >&2 || true; }

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
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
# No cgroups here (containers, no systemd): track processes by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# A job whose dependency failed is cancelled, not left pending forever; pending jobs (a
# requeued job once its hold ends) are looked at every 2 s, not every 60 s.
SchedulerParameters=kill_invalid_depend,sched_interval=2,bf_interval=2
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# For connections to slurmdbd, Slurm takes the munge socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_DIR/munge.socket
JobCompType=jobcomp/none
# Quick turnaround for tests: short kill grace, finished jobs leave squeue after 30 s.
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST NodeAddr=127.0.0.1 $node_hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf" || conf_changed=1
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"

# slurmdbd refuses a config readable by others (it holds the database password).
umask 077
cat >"$ETC/slurmdbd.conf" <<EOF
# Written by tests/slurm/start_local_slurm.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
umask 022
chmod 600 "$ETC/slurmdbd.conf"

# Empty cgroup/plugstack configs so nothing is read from /etc/slurm.
: >"$ETC/plugstack.conf"

# ------------------------------------------------------------------ munge (as user munge)
if alive munged "$MUNGE_DIR/munged.pid"; then
    say "munged already running"
else
    chown munge:munge "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_DIR/munge.socket" "$MUNGE_DIR/munge.socket.lock"
    # munged daemonizes itself and writes its pid file.
    runuser -u munge -- munged --force --num-threads=10 \
        --socket="$MUNGE_DIR/munge.socket" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        || { show_log "$MUNGE_DIR/munged.log"; die "munged did not start (log above)"; }
    wait_for 20 "munged started" munge -n --socket="$MUNGE_DIR/munge.socket" \
        || { show_log "$MUNGE_DIR/munged.log"; die "munged does not answer on $MUNGE_DIR/munge.socket"; }
fi

# ------------------------------------------------------------------ MariaDB (private instance)
mysql_cli=(mariadb --no-defaults --socket="$DB_DIR/mysqld.sock" -uroot)
if alive mariadbd "$DB_DIR/mariadbd.pid"; then
    say "mariadbd already running"
else
    if [ ! -d "$DB_DIR/data/mysql" ]; then
        rm -rf "$DB_DIR/data"
        mkdir -p "$DB_DIR/data"
        chown -R mysql:mysql "$DB_DIR"
        mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user=mysql \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOG/mariadb-install-db.log" 2>&1 \
            || { show_log "$LOG/mariadb-install-db.log"; die "mariadb-install-db failed"; }
    fi
    chown -R mysql:mysql "$DB_DIR"
    # mariadbd stays in the foreground: detach it from this shell (setsid) and its output.
    setsid mariadbd --no-defaults --user=mysql --datadir="$DB_DIR/data" \
        --socket="$DB_DIR/mysqld.sock" --port="$DB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$DB_DIR/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
        --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
        --performance-schema=OFF --skip-name-resolve --innodb-lock-wait-timeout=900 \
        </dev/null >/dev/null 2>&1 &
    wait_for 60 "mariadbd started" "${mysql_cli[@]}" -e "SELECT 1" \
        || { show_log "$LOG/mariadbd.log"; die "mariadbd did not come up on $DB_DIR/mysqld.sock"; }
fi
"${mysql_cli[@]}" -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';" \
    || die "could not create the slurm_acct_db database and user in the private MariaDB"

# ------------------------------------------------------------------ slurmdbd
if alive slurmdbd "$RUN/slurmdbd.pid"; then
    say "slurmdbd already running"
else
    slurmdbd || { show_log "$LOG/slurmdbd.log"; die "slurmdbd did not start"; }
    wait_for 60 "slurmdbd answers" sacctmgr -n list cluster \
        || { show_log "$LOG/slurmdbd.log"; die "slurmdbd does not answer on port $DBD_PORT"; }
fi
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr could not register cluster $CLUSTER"
fi

# ------------------------------------------------------------------ slurmctld, slurmd
if alive slurmctld "$RUN/slurmctld.pid"; then
    say "slurmctld already running"
    if [ $conf_changed = 1 ]; then
        scontrol reconfigure && say "slurm.conf changed: daemons reconfigured"
    fi
else
    slurmctld -f "$SLURM_CONF" || { show_log "$LOG/slurmctld.log"; die "slurmctld did not start"; }
    wait_for 60 "slurmctld answers" scontrol ping \
        || { show_log "$LOG/slurmctld.log"; die "slurmctld does not answer on port $CTLD_PORT"; }
fi
if alive slurmd "$RUN/slurmd.pid"; then
    say "slurmd already running"
else
    slurmd -f "$SLURM_CONF" || { show_log "$LOG/slurmd.log"; die "slurmd did not start"; }
fi

node_ready() {
    local state
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n1)
    case "$state" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}
wait_for 60 "node $HOST is up (partition $PARTITION)" node_ready || {
    show_log "$LOG/slurmd.log"; show_log "$LOG/slurmctld.log"
    die "node $HOST did not become idle: $(sinfo -h -n "$HOST" -o '%T %E' 2>&1)"
}
# The controller may register with slurmdbd a moment after it answers; sacct must work.
wait_for 30 "accounting works (sacct)" sacct -n -X --starttime=now-1minute \
    || { show_log "$LOG/slurmdbd.log"; die "sacct does not answer"; }

echo "export SLURM_CONF=$SLURM_CONF"
