#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/start_local_slurm.sh: cancel every job first
# (stopping slurmd leaves running job steps alive), then end each daemon by the pid it recorded,
# after checking that the pid still is that daemon. Nothing else is touched. Harmless when
# nothing runs. State (job ids, accounting database) is kept for the next start.
set -uo pipefail

DIR=${SMOOTHAP_SLURM_DIR:-/tmp/smoothap-slurm}
export SLURM_CONF=$DIR/etc/slurm.conf
RUN=$DIR/run

TAG=stop_local_slurm
# shellcheck source=tests/slurm/common.sh
. "$(dirname "$0")/common.sh"

alive slurmctld "$RUN/slurmctld.pid" && cancel_all_jobs

# Controller and node daemon first (the controller reports to slurmdbd on its way out), then
# accounting and its database, munge last (everyone above authenticates through it).
stop_daemons "slurmd:$RUN/slurmd.pid" "slurmctld:$RUN/slurmctld.pid"
stop_daemons "slurmdbd:$RUN/slurmdbd.pid" "mariadbd:$DIR/mariadb/mariadbd.pid"
stop_daemons "munged:$DIR/munge/munged.pid"
exit 0
