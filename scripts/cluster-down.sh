#!/usr/bin/env bash
# Take down the cluster scripts/cluster-up.sh made: the daemons it recorded (by PID), any
# process still inside a node's namespace (by PID), the namespaces mpnI, the bridge mpnbr0
# and $MPINN_CLUSTER_DIR. Safe to run when nothing is up; touches nothing else.
set -uo pipefail
DIR=${MPINN_CLUSTER_DIR:-/run/mpinn-cluster}
[ "$(id -u)" -eq 0 ] || { echo "cluster-down: needs root" >&2; exit 2; }
pids=()
for pidfile in "$DIR"/slurm/*.pid; do
    # only a SLURM daemon: a stale file's PID may since belong to someone else
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    case $(cat "/proc/$pid/comm" 2>/dev/null) in slurmctld|slurmd) pids+=("$pid") ;; esac
done
nodes=$(ls /run/netns 2>/dev/null | grep -E '^mpn[0-9]+$' || true)
for ns in $nodes; do
    pids+=($(ip netns pids "$ns" 2>/dev/null))
done
if [ "${#pids[@]}" -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null
    # give the daemons a moment to save their state, then make sure
    for _ in $(seq 1 50); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 1 ] || break
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null
fi
for ns in $nodes; do
    ip netns del "$ns" 2>/dev/null  # its veth pair goes with it
done
ip link show mpnbr0 >/dev/null 2>&1 && ip link del mpnbr0
rm -rf "$DIR"
exit 0
