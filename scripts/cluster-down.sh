#!/usr/bin/env bash
# Take down the cluster scripts/cluster-up.sh made: the shared filesystem's mounts (which
# ends their FUSE clients), the daemons it recorded (by PID), any process still inside a
# node's namespace (by PID: jobs, slurmd, glusterd and its brick in mpn0), the nodes' mount
# namespaces, the namespaces mpnI, the bridge mpnbr0, the brick, the logs GlusterFS wrote and
# $MPINN_CLUSTER_DIR. Safe to run when nothing is up; touches nothing else.
set -uo pipefail
DIR=${MPINN_CLUSTER_DIR:-/run/mpinn-cluster}
G=$DIR/gluster
BRICK=${MPINN_CLUSTER_BRICK:-/var/tmp/mpinn-cluster-brick}
MNT=/shared
[ "$(id -u)" -eq 0 ] || { echo "cluster-down: needs root" >&2; exit 2; }
for ns in "$G"/ns/mnt*; do
    [ -e "$ns" ] || continue
    nsenter --mount="$ns" umount "$MNT" 2>/dev/null || nsenter --mount="$ns" umount -l "$MNT" 2>/dev/null
done
if grep -q " $MNT fuse.glusterfs " /proc/self/mounts; then
    umount "$MNT" 2>/dev/null || umount -l "$MNT"
fi
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
for ns in "$G"/ns/mnt*; do [ -e "$ns" ] && umount "$ns" 2>/dev/null; done
mountpoint -q "$G/ns" && umount "$G/ns"
if [ -e "$G/glusterd.vol" ]; then
    rm -rf "$BRICK"
    # what the brick process writes outside the storage node's own directory
    rm -f /var/log/glusterfs/bricks/"$(echo "${BRICK#/}/gv0" | tr / -)".log* \
        /var/log/glusterfs/cli.log* /var/log/glusterfs/cmd_history.log*
    rm -f /var/run/gluster/*.socket
    [ -d "$MNT" ] && ! mountpoint -q "$MNT" && rmdir "$MNT" 2>/dev/null
fi
rm -rf "$DIR"
exit 0
