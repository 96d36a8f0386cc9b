#!/usr/bin/env bash
# Stop the cluster started by tests/cluster/start_cluster.sh and remove what it made: jobs are
# cancelled, each daemon is ended by the pid it recorded (after checking the pid still is that
# daemon), then the host namespaces (their veths go with them), the bridge and the /etc/hosts
# lines it added are removed. Harmless when nothing runs; safe to run twice.
#
#   tests/cluster/stop_cluster.sh           # keeps $SMOOTHAP_CLUSTER_DIR (logs, accounting db)
#   tests/cluster/stop_cluster.sh --purge   # also deletes that directory
set -uo pipefail

DIR=${SMOOTHAP_CLUSTER_DIR:-/tmp/smoothap-cluster}
export SLURM_CONF=$DIR/etc/slurm.conf
RUN=$DIR/run
BRIDGE=sapbr0
PREFIX=sapnode
HOSTS_MARK="# smoothap-test-cluster"

TAG=stop_cluster
# shellcheck source=tests/slurm/common.sh
. "$(dirname "$0")/../slurm/common.sh"

purge=0
case "${1:-}" in
    "") ;;
    --purge) purge=1 ;;
    *) die "unknown argument '$1': the only option is --purge (also delete $DIR)" ;;
esac

alive slurmctld "$RUN/slurmctld.pid" && cancel_all_jobs

# Node daemons and controller first (the controller reports to slurmdbd on its way out), then
# accounting and its database, munge last (everyone above authenticates through it). The names
# are those start_cluster.sh can create (1..4), so a lost $DIR/hosts file loses nothing.
slurmds=()
for i in 1 2 3 4; do slurmds+=("slurmd:$RUN/slurmd-$PREFIX$i.pid"); done
stop_daemons "${slurmds[@]}" "slurmctld:$RUN/slurmctld.pid"
stop_daemons "slurmdbd:$RUN/slurmdbd.pid" "mariadbd:$DIR/mariadb/mariadbd.pid"
stop_daemons "munged:$DIR/munge/munged.pid"

for i in 1 2 3 4; do
    h=$PREFIX$i
    # A process left in the namespace (a job step that outlived its slurmd) keeps it alive
    # after `ip netns del`: end those by pid first, found through their network namespace.
    if [ -e "/var/run/netns/$h" ]; then
        for pid in $(ip netns pids "$h" 2>/dev/null); do
            say "ending pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) left in $h"
            kill -KILL "$pid" 2>/dev/null
        done
        ip netns del "$h" && say "removed network namespace $h"
    fi
    # Normally gone with the namespace (its peer lived there); removed here if not.
    ip link del "sapv$i" 2>/dev/null && say "removed veth sapv$i"
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link del "$BRIDGE" && say "removed bridge $BRIDGE"
fi

if grep -qF "$HOSTS_MARK" /etc/hosts; then
    # Rewritten in place (cat >), since /etc/hosts may be a bind mount.
    kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
    say "removed the test hosts from /etc/hosts"
fi
rm -f "$DIR/hosts"

if [ $purge = 1 ] && [ -d "$DIR" ]; then
    rm -rf "$DIR" && say "deleted $DIR"
fi
exit 0
