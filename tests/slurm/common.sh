# Shared by the test-cluster scripts (tests/slurm/start_local_slurm.sh, one host on loopback;
# tests/cluster/start_cluster.sh, several hosts in network namespaces) and their stop scripts.
# Source it after setting TAG (the prefix of every message); it defines functions only.
#
# The daemons it starts are private to the calling script's state directory: their own munge
# socket and key, their own MariaDB (data directory, socket, port), their own ports, so that the
# two clusters, a system Slurm and a system MariaDB can all run side by side.

say() { echo "[$TAG] $*"; }
die() { echo "[$TAG] ERROR: $*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (it starts Slurm daemons as root and may apt-get install); re-run with sudo"
}

# install_packages: Debian's Slurm 22.05, munge and MariaDB, only when a program is missing.
install_packages() {
    local pair need_pkgs=()
    for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge \
                slurmdbd:slurmdbd mariadbd:mariadb-server; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
    done
    [ ${#need_pkgs[@]} -gt 0 ] || return 0
    say "installing ${need_pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # No service may start from a package's postinst: these scripts start their own daemons.
    local policy_created=0 apt_ok=0 attempt
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    for attempt in 1 2 3; do
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client slurmdbd munge mariadb-server mariadb-client >/dev/null; then
            apt_ok=1; break
        fi
        # Another apt-get (a colleague's start script) may hold the dpkg lock: wait and retry.
        say "apt-get failed (attempt $attempt), retrying in 5 s"; sleep 5
    done
    [ $policy_created = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $apt_ok = 1 ] || die "apt-get install of ${need_pkgs[*]} failed; check network access to the Debian mirror"
}

# alive NAME PIDFILE: the recorded pid exists and is the expected program (pids get reused).
alive() {
    pid_of "$@" >/dev/null
}

# pid_of NAME PIDFILE: print the recorded pid if it is alive and is NAME.
pid_of() {
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    echo "$pid"
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

# start_munge DIR: munged (as user munge) with its key, socket, pid and log under DIR.
start_munge() {
    local dir=$1
    if alive munged "$dir/munged.pid"; then
        say "munged already running"
        return 0
    fi
    mkdir -p "$dir"
    chown munge:munge "$dir"
    chmod 700 "$dir"
    if [ ! -s "$dir/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$dir/munge.key"
    chmod 400 "$dir/munge.key"
    rm -f "$dir/munge.socket" "$dir/munge.socket.lock"
    # munged daemonizes itself and writes its pid file.
    runuser -u munge -- munged --force --num-threads=10 \
        --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
        --seed-file="$dir/munged.seed" \
        || { show_log "$dir/munged.log"; die "munged did not start (log above)"; }
    wait_for 20 "munged started" munge -n --socket="$dir/munge.socket" \
        || { show_log "$dir/munged.log"; die "munged does not answer on $dir/munge.socket"; }
}

# start_mariadb DIR LOGDIR PORT USER PASSWORD: a private MariaDB on 127.0.0.1:PORT holding an
# empty slurm_acct_db that USER@127.0.0.1 may use.
start_mariadb() {
    local dir=$1 log=$2 port=$3 user=$4 pass=$5
    local cli=(mariadb --no-defaults --socket="$dir/mysqld.sock" -uroot)
    if alive mariadbd "$dir/mariadbd.pid"; then
        say "mariadbd already running"
    else
        mkdir -p "$dir"
        if [ ! -d "$dir/data/mysql" ]; then
            rm -rf "$dir/data"
            mkdir -p "$dir/data"
            chown -R mysql:mysql "$dir"
            mariadb-install-db --no-defaults --datadir="$dir/data" --user=mysql \
                --auth-root-authentication-method=socket --skip-test-db \
                >"$log/mariadb-install-db.log" 2>&1 \
                || { show_log "$log/mariadb-install-db.log"; die "mariadb-install-db failed"; }
        fi
        chown -R mysql:mysql "$dir"
        # mariadbd stays in the foreground: detach it from this shell (setsid) and its output.
        setsid mariadbd --no-defaults --user=mysql --datadir="$dir/data" \
            --socket="$dir/mysqld.sock" --port="$port" --bind-address=127.0.0.1 \
            --pid-file="$dir/mariadbd.pid" --log-error="$log/mariadbd.log" \
            --skip-log-bin --innodb-buffer-pool-size=64M --innodb-log-file-size=16M \
            --performance-schema=OFF --skip-name-resolve --innodb-lock-wait-timeout=900 \
            </dev/null >/dev/null 2>&1 &
        wait_for 60 "mariadbd started" "${cli[@]}" -e "SELECT 1" \
            || { show_log "$log/mariadbd.log"; die "mariadbd did not come up on $dir/mysqld.sock"; }
    fi
    "${cli[@]}" -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS '$user'@'127.0.0.1' IDENTIFIED BY '$pass';
        GRANT ALL ON slurm_acct_db.* TO '$user'@'127.0.0.1';" \
        || die "could not create the slurm_acct_db database and user in the private MariaDB"
}

# slurm_conf_common MUNGE_DIR CRED_EXPIRE DBD_ADDR DBD_PORT: the slurm.conf lines both test
# clusters share (authentication, scheduling, accounting, timeouts); each script adds its
# names, ports, paths and nodes.
slurm_conf_common() {
    local munge_dir=$1 cred_expire=$2 dbd_addr=$3 dbd_port=$4
    cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_dir/munge.socket,cred_expire=$cred_expire
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
AccountingStorageHost=$dbd_addr
AccountingStoragePort=$dbd_port
# For connections to slurmdbd, Slurm takes the munge socket from here, not from AuthInfo.
AccountingStoragePass=$munge_dir/munge.socket
JobCompType=jobcomp/none
# Quick turnaround for tests: short kill grace, finished jobs leave squeue after 30 s.
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
EOF
}

# write_slurmdbd_conf FILE MUNGE_DIR ADDR DBD_PORT RUN LOG DB_PORT USER PASSWORD
write_slurmdbd_conf() {
    local file=$1 munge_dir=$2 addr=$3 dbd_port=$4 run=$5 log=$6 db_port=$7 user=$8 pass=$9
    # slurmdbd refuses a config readable by others (it holds the database password).
    (
        umask 077
        cat >"$file" <<EOF
# Written by the test-cluster scripts (tests/slurm/common.sh).
AuthType=auth/munge
AuthInfo=socket=$munge_dir/munge.socket
DbdHost=$(hostname -s)
DbdAddr=$addr
DbdPort=$dbd_port
SlurmUser=root
PidFile=$run/slurmdbd.pid
LogFile=$log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=$user
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF
    )
    chmod 600 "$file"
}

# start_slurmdbd RUN LOG CLUSTER: slurmdbd (config beside SLURM_CONF), then the cluster record.
start_slurmdbd() {
    local run=$1 log=$2 cluster=$3
    if alive slurmdbd "$run/slurmdbd.pid"; then
        say "slurmdbd already running"
    else
        slurmdbd || { show_log "$log/slurmdbd.log"; die "slurmdbd did not start"; }
        wait_for 60 "slurmdbd answers" sacctmgr -n list cluster \
            || { show_log "$log/slurmdbd.log"; die "slurmdbd does not answer (log above)"; }
    fi
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$cluster"; then
        sacctmgr -i add cluster "$cluster" >/dev/null || die "sacctmgr could not register cluster $cluster"
    fi
}

# start_slurmctld RUN LOG CONF_CHANGED: the controller, or `scontrol reconfigure` when it runs
# and its configuration changed.
start_slurmctld() {
    local run=$1 log=$2 conf_changed=$3
    if alive slurmctld "$run/slurmctld.pid"; then
        say "slurmctld already running"
        if [ "$conf_changed" = 1 ]; then
            scontrol reconfigure && say "slurm.conf changed: daemons reconfigured"
        fi
    else
        slurmctld -f "$SLURM_CONF" || { show_log "$log/slurmctld.log"; die "slurmctld did not start"; }
        wait_for 60 "slurmctld answers" scontrol ping \
            || { show_log "$log/slurmctld.log"; die "slurmctld does not answer (log above)"; }
    fi
}

# node_ready NODE: slurmctld sees NODE up (idle or busy).
node_ready() {
    local state
    state=$(sinfo -h -n "$1" -o %T 2>/dev/null | head -n1)
    case "$state" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

# wait_accounting LOG: the controller may register with slurmdbd a moment after it answers.
wait_accounting() {
    wait_for 30 "accounting works (sacct)" sacct -n -X --starttime=now-1minute \
        || { show_log "$1/slurmdbd.log"; die "sacct does not answer"; }
}

# cancel_all_jobs: scancel every job and wait up to 30 s for them to leave (stopping slurmd
# would leave running job steps alive).
cancel_all_jobs() {
    local jobs left i
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    [ -n "${jobs// /}" ] || return 0
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for i in $(seq 150); do
        left=$(squeue -h -t RUNNING,COMPLETING,PENDING,CONFIGURING -o %A 2>/dev/null)
        [ -z "$left" ] && break
        sleep 0.2
    done
    [ -n "${left:-}" ] && say "jobs still present after 30 s: $left"
    return 0
}

# stop_daemons NAME:PIDFILE...: SIGTERM to all, wait up to 30 s, then SIGKILL the rest.
stop_daemons() {
    local item name pidfile pid i left pids=() names=()
    for item in "$@"; do
        name=${item%%:*} pidfile=${item#*:}
        if pid=$(pid_of "$name" "$pidfile"); then
            kill -TERM "$pid" 2>/dev/null
            pids+=("$pid") names+=("$name")
            rm -f "$pidfile"
        else
            say "$name not running ($pidfile)"
        fi
    done
    for i in $(seq 150); do
        left=0
        for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && left=1; done
        [ $left = 0 ] && break
        sleep 0.2
    done
    for i in "${!pids[@]}"; do
        if [ -d "/proc/${pids[$i]}" ]; then
            say "${names[$i]} (pid ${pids[$i]}) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null
        fi
        say "stopped ${names[$i]} (pid ${pids[$i]})"
    done
}
