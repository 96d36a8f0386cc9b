#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/start_local_slurm.sh: cancel every job first
# (stopping slurmd leaves running job steps alive), then end each daemon by the pid it recorded,
# after checking that the pid still is that daemon. Nothing else is touched. Harmless when
# nothing runs. State (job ids, accounting database) is kept for the next start.
set -uo pipefail

DIR=${SMOOTHAP_SLURM_DIR:-/tmp/smoothap-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf
RUN=$DIR/run

say() { echo "[stop_local_slurm] $*"; }

pid_of() {  # pid_of NAME PIDFILE: print the recorded pid if it is alive and is NAME
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    echo "$pid"
}

stop() {  # stop NAME:PIDFILE...: SIGTERM to all, wait up to 30 s, then SIGKILL the rest
    local item name pidfile pid i pids=() names=()
    for item in "$@"; do
        name=${item%%:*} pidfile=${item#*:}
        if pid=$(pid_of "$name" "$pidfile"); then
            kill -TERM "$pid" 2>/dev/null
            pids+=("$pid") names+=("$name")
            rm -f "$pidfile"
        else
            say "$name not running"
        fi
    done
    for i in $(seq 150); do
        local left=0
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

if pid_of slurmctld "$RUN/slurmctld.pid" >/dev/null; then
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for i in $(seq 150); do
            left=$(squeue -h -t RUNNING,COMPLETING,PENDING,CONFIGURING -o %A 2>/dev/null)
            [ -z "$left" ] && break
            sleep 0.2
        done
        [ -n "${left:-}" ] && say "jobs still present after 30 s: $left"
    fi
fi

# Controller and node daemon first (the controller reports to slurmdbd on its way out), then
# accounting and its database, munge last (everyone above authenticates through it).
stop "slurmd:$RUN/slurmd.pid" "slurmctld:$RUN/slurmctld.pid"
stop "slurmdbd:$RUN/slurmdbd.pid" "mariadbd:$DIR/mariadb/mariadbd.pid"
stop "munged:$DIR/munge/munged.pid"
exit 0
