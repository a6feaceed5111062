#!/usr/bin/env bash
# A cluster of NODES real network nodes on this one machine, for multi-node tests and benchmarks:
#   scripts/cluster-up.sh NODES [RATE] [--slurm]    e.g. 2 1gbit | 2 10gbit | 2 (no limit)
# Each node I is a network namespace mpnI at 10.77.0.I/24 with its own hostname (nodeI) for
# whatever runs in it; a bridge mpnbr0 at 10.77.0.254 joins them to the root namespace, where
# mpirun (and slurmctld) run. RATE limits each node's link both ways (tc tbf). The files
# system is shared, as on a cluster with a shared filesystem. Needs root; prints the reason
# and exits 2 where the namespaces cannot be made. Running it again with the same NODES and
# RATE leaves a running cluster alone; with others it rebuilds it. It writes to
# $MPINN_CLUSTER_DIR (default /run/mpinn-cluster):
#   hostfile   the node addresses, SLOTS (default: the machine's cores) each
#   rsh        the agent Open MPI starts its daemons with: rsh HOST CMD... runs CMD on HOST
#   mpirun     mpirun across the nodes: $DIR/mpirun -n 4 --npernode 2 python -m mpinn ...
#   nodes      "NODES RATE", read by cluster-down.sh and by the tests
#   on         on I CMD...: run CMD on node I, in the current directory
# With --slurm it also starts SLURM on the nodes (slurmctld here, one slurmd per node; Debian's
# packages and munge installed when missing) and writes slurm/slurm.conf: sbatch -N NODES
# with SLURM_CONF=$DIR/slurm/slurm.conf. Its ports (6827, 6828) differ from slurm-up.sh's.
# With --shared-fs gluster the nodes share a network filesystem instead of this machine's
# disk: a storage node mpn0 (10.77.0.250, no rate limit) serves a GlusterFS volume, and every
# node mounts it at /shared through its own FUSE client in its own mount namespace, as a
# cluster's nodes mount their shared filesystem; this machine's own namespace (the login
# node: mpirun, sbatch, the tests) mounts it at /shared too, through the bridge. `gluster` is
# coherent across nodes (docs/filesystems.md); `gluster-cached` keeps Gluster's default
# caching, under which a node may read a stale copy of a file another node replaced.
# GlusterFS is installed when missing; where it cannot be, or FUSE cannot mount, it says why
# and exits 2. Undo with scripts/cluster-down.sh. Only 10.77.0.0/24 inside these namespaces
# is used; lo and eth0 of the machine are never touched.
set -Eeuo pipefail  # -E: the ERR trap below holds inside functions too
usage="usage: cluster-up.sh NODES [RATE] [--slurm] [--shared-fs gluster|gluster-cached]"
slurm=0
fs=local
args=()
while [ $# -gt 0 ]; do
    case $1 in
        --slurm) slurm=1 ;;
        --shared-fs)
            [ $# -ge 2 ] || { echo "cluster-up: --shared-fs needs gluster or gluster-cached" >&2; exit 1; }
            fs=$2; shift ;;
        --shared-fs=*) fs=${1#--shared-fs=} ;;
        -*) echo "cluster-up: unknown option $1; $usage" >&2; exit 1 ;;
        *) args+=("$1") ;;
    esac
    shift
done
case $fs in local|gluster|gluster-cached) ;;
    *) echo "cluster-up: --shared-fs is gluster or gluster-cached, not '$fs'" >&2; exit 1 ;;
esac
[ ${#args[@]} -le 2 ] || { echo "cluster-up: too many arguments; $usage" >&2; exit 1; }
NODES=${args[0]:-}
[ -n "$NODES" ] || { echo "cluster-up: $usage" >&2; exit 1; }
RATE=${args[1]:-unlimited}
DIR=${MPINN_CLUSTER_DIR:-/run/mpinn-cluster}
SLOTS=${SLOTS:-$(nproc --all)}
HERE=$(cd "$(dirname "$0")" && pwd)
case $NODES in ''|*[!0-9]*) echo "cluster-up: NODES must be a number from 1 to 250, not '$NODES'" >&2; exit 1;; esac
if [ "$NODES" -lt 1 ] || [ "$NODES" -gt 250 ]; then
    echo "cluster-up: NODES must be a number from 1 to 250, not '$NODES'" >&2; exit 1
fi
case $RATE in unlimited|[0-9]*bit) ;; *) echo "cluster-up: RATE is a tc rate such as 1gbit or 100mbit, or unlimited, not '$RATE'" >&2; exit 1;; esac
[ "$(id -u)" -eq 0 ] || { echo "cluster-up: needs root (network namespaces)" >&2; exit 2; }
for tool in ip tc unshare nsenter mpirun; do
    command -v "$tool" >/dev/null || { echo "cluster-up: $tool is not installed" >&2; exit 2; }
done

MNT=/shared
SRV=10.77.0.250
G=$DIR/gluster
BRICK=${MPINN_CLUSTER_BRICK:-/var/tmp/mpinn-cluster-brick}
nodes_up() {  # the nodes (and their shared filesystem) as asked for are up
    [ "$(cat "$DIR/nodes" 2>/dev/null)" = "$NODES $RATE $fs" ] || return 1
    ip link show mpnbr0 >/dev/null 2>&1 || return 1
    for i in $(seq 1 "$NODES"); do [ -e "/run/netns/mpn$i" ] || return 1; done
    [ "$fs" = local ] || mountpoint -q "$MNT"
}
sinfo_idle() {  # every node of the SLURM cluster is idle (sinfo waits long for no slurmctld)
    [ -s "$DIR/slurm/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurm/slurmctld.pid")" 2>/dev/null \
        && [ "$(SLURM_CONF=$DIR/slurm/slurm.conf sinfo -h -o '%T %D' 2>/dev/null)" = "idle $NODES" ]
}
make_nodes() {
    # a namespace that cannot be made (no CAP_SYS_ADMIN in a container, no netns support) is
    # a reason to skip, not an error
    if ! why=$(ip netns add mpn1 2>&1) || ! why=$(ip link add mpnbr0 type bridge 2>&1); then
        ip netns del mpn1 2>/dev/null || true
        echo "cluster-up: cannot make network namespaces here: $why" >&2
        exit 2
    fi
    mkdir -p "$DIR"
    echo "$NODES $RATE $fs" > "$DIR/nodes"
    ip addr add 10.77.0.254/24 dev mpnbr0
    ip link set mpnbr0 up
    : > "$DIR/hostfile"
    for i in $(seq 1 "$NODES"); do
        [ -e "/run/netns/mpn$i" ] || ip netns add "mpn$i"
        ip link add "mpnh$i" type veth peer name "mpnn$i" netns "mpn$i"
        ip link set "mpnh$i" master mpnbr0 up
        ip -n "mpn$i" addr add "10.77.0.$i/24" dev "mpnn$i"
        ip -n "mpn$i" link set lo up
        ip -n "mpn$i" link set "mpnn$i" up
        if [ "$RATE" != unlimited ]; then
            # both directions: into the node (the bridge's end) and out of it (the node's end)
            tc qdisc add dev "mpnh$i" root tbf rate "$RATE" burst 256kb latency 50ms
            ip netns exec "mpn$i" tc qdisc add dev "mpnn$i" root tbf rate "$RATE" burst 256kb latency 50ms
        fi
        echo "10.77.0.$i slots=$SLOTS" >> "$DIR/hostfile"
    done

    # how a command enters node I: its network namespace, its own mount namespace where the
    # nodes mount a shared filesystem, and its own hostname. Open MPI's rsh launcher calls
    # AGENT HOST CMD... as it would ssh: CMD's words are one shell line
    if [ "$fs" = local ]; then enter='ip netns exec "mpn$i"'
    else enter='nsenter --net="/run/netns/mpn$i" --mount="'"$G"'/ns/mnt$i"'; fi
    cat > "$DIR/rsh" <<AGENT
#!/bin/sh
# rsh HOST CMD...: run CMD on cluster node HOST (10.77.0.I or nodeI), as ssh would
host=\$1; shift
case \$host in
    10.77.0.*) i=\${host#10.77.0.} ;;
    node*) i=\${host#node} ;;
    *) echo "rsh: \$host is not a node of the mpinn cluster" >&2; exit 255 ;;
esac
[ -e "/run/netns/mpn\$i" ] && [ "\$i" -ge 1 ] || { echo "rsh: no node \$host (is the cluster up?)" >&2; exit 255; }
exec $enter unshare --uts sh -c "hostname node\$i; \$*"
AGENT
    cat > "$DIR/on" <<ON
#!/bin/sh
# on I CMD...: run CMD on node I (its network, its filesystems, hostname nodeI), in this directory
i=\${1:?usage: on I CMD...}; shift
[ -e "/run/netns/mpn\$i" ] && [ "\$i" -ge 1 ] || { echo "on: no node \$i (is the cluster up?)" >&2; exit 255; }
exec $enter unshare --uts sh -c 'hostname "node\$0"; cd "\$1" && shift && exec "\$@"' "\$i" "\$PWD" "\$@"
ON

    # mpi_yield_when_idle: on a few cores a rank spinning in MPI delays the veth's receive
    # softirq to the next timer tick (4 ms a message); a real NIC's interrupts do not, so this
    # setting belongs to the simulated cluster, not to jobs/ for real ones. --bind-to none
    # likewise: every node's daemon sees this machine's cores as its own and binds its first
    # rank to core 0, so one rank a node put every node's rank on the same core (2 servers
    # trained at 378 samples/s, half their speed; unbound 652)
    cat > "$DIR/mpirun" <<WRAP
#!/bin/sh
# mpirun across the nodes of the mpinn cluster: $DIR/mpirun -n 4 --npernode 2 CMD...
exec mpirun --hostfile "$DIR/hostfile" --mca plm_rsh_agent "$DIR/rsh" \\
    --mca pml ob1 --mca btl vader,tcp,self --mca btl_tcp_if_include 10.77.0.0/24 \\
    --mca oob_tcp_if_include 10.77.0.0/24 --mca mpi_yield_when_idle 1 --bind-to none "\$@"
WRAP
    chmod 755 "$DIR/rsh" "$DIR/on" "$DIR/mpirun"
}

no_shared_fs() {  # the reason there is no shared filesystem here: exit 2, nothing left made
    echo "cluster-up: no GlusterFS here: $1" >&2
    trap - ERR
    bash "$HERE/cluster-down.sh" >/dev/null 2>&1
    exit 2
}

# GlusterFS (recipe and measurements: docs/filesystems.md). The storage node mpn0 runs glusterd
# with a volfile of its own (its state under $G, never the machine's /var/lib/glusterd) and the
# brick under $BRICK; each node I mounts the volume in a mount namespace of its own, kept alive
# by a bind mount of its nsfs file under $G/ns.
make_shared_fs() {
    if ! command -v glusterd >/dev/null || ! command -v mount.glusterfs >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            glusterfs-server glusterfs-client >/dev/null; } 2>/dev/null \
            || no_shared_fs "Debian's glusterfs-server and glusterfs-client cannot be installed"
    fi
    [ -c /dev/fuse ] || no_shared_fs "no /dev/fuse (FUSE), which the GlusterFS client mounts with"
    ip netns add mpn0
    ip link add mpnh0 type veth peer name mpnn0 netns mpn0
    ip link set mpnh0 master mpnbr0 up
    ip -n mpn0 addr add "$SRV/24" dev mpnn0
    ip -n mpn0 link set lo up
    ip -n mpn0 link set mpnn0 up
    rm -rf "$BRICK"
    mkdir -p "$G/state" "$G/run" "$BRICK" "$MNT"
    cat > "$G/glusterd.vol" <<VOL
volume management
    type mgmt/glusterd
    option working-directory $G/state
    option run-directory $G/run
    option glusterd-sockfile $G/glusterd.socket
    option transport-type socket
    option transport.socket.listen-port 24007
    option ping-timeout 0
    option event-threads 1
end-volume
VOL
    nsenter --net=/run/netns/mpn0 glusterd -f "$G/glusterd.vol" -p "$G/glusterd.pid" -l "$G/glusterd.log"
    local gl=(nsenter --net=/run/netns/mpn0 gluster --mode=script --glusterd-sock="$G/glusterd.socket")
    for _ in $(seq 1 100); do "${gl[@]}" volume list >/dev/null 2>&1 && break; sleep 0.1; done
    "${gl[@]}" volume create gv0 transport tcp "$SRV:$BRICK/gv0" force >/dev/null
    # coherent: without these a node reads the old content of a file another node replaced,
    # opens a renamed-away file and misses creates and unlinks (measured: docs/filesystems.md)
    local opts=log-level=WARNING
    if [ "$fs" = gluster ]; then
        for o in quick-read stat-prefetch open-behind; do
            "${gl[@]}" volume set gv0 "performance.$o" off >/dev/null
        done
        opts=attribute-timeout=0,entry-timeout=0,negative-timeout=0,direct-io-mode=enable,$opts
    fi
    "${gl[@]}" volume start gv0 >/dev/null
    mkdir -p "$G/ns"
    mountpoint -q "$G/ns" || { mount --bind "$G/ns" "$G/ns"; mount --make-private "$G/ns"; }
    local why
    for i in $(seq 1 "$NODES"); do
        touch "$G/ns/mnt$i"
        unshare --mount="$G/ns/mnt$i" --propagation private true
        why=$(nsenter --net="/run/netns/mpn$i" --mount="$G/ns/mnt$i" mount -t glusterfs \
              -o "$opts,log-file=$G/client$i.log" "$SRV:/gv0" "$MNT" 2>&1) \
            || no_shared_fs "node $i cannot mount the volume: $why $(tail -n 3 "$G/client$i.log" 2>/dev/null)"
    done
    # the login node's view (this namespace: mpirun, sbatch, the user's shell), through the bridge
    why=$(mount -t glusterfs -o "$opts,log-file=$G/client0.log" "$SRV:/gv0" "$MNT" 2>&1) \
        || no_shared_fs "this machine cannot mount the volume: $why"
    chmod 1777 "$MNT"
}

if nodes_up; then
    if [ "$slurm" = 0 ] || sinfo_idle; then
        echo "cluster-up: $NODES nodes at $RATE already up; mpirun across them: $DIR/mpirun"
        [ "$slurm" = 0 ] || echo "export SLURM_CONF=$DIR/slurm/slurm.conf"
        exit 0
    fi
    # the nodes are up, SLURM is not: start it alone, keeping what the shared filesystem holds
else
    bash "$HERE/cluster-down.sh" >/dev/null 2>&1 || true
    # from here on a failure, or Ctrl-C, leaves nothing half made
    trap 'echo "cluster-up: failed (line $LINENO); taking down what was made" >&2
          bash "$HERE/cluster-down.sh"' ERR
    trap 'trap - ERR; echo "cluster-up: interrupted; taking down what was made" >&2
          bash "$HERE/cluster-down.sh"; exit 130' INT TERM
    make_nodes
    [ "$fs" = local ] || make_shared_fs
    trap - INT TERM
    echo "cluster-up: $NODES nodes at $RATE; mpirun across them: $DIR/mpirun; one command on node I: $DIR/on I CMD"
    [ "$fs" = local ] || echo "cluster-up: GlusterFS ($fs) at $MNT on every node and here"
fi
[ "$slurm" = 1 ] || exit 0

# SLURM: slurmctld in the root namespace at the bridge's address, slurmd nodeI inside node I
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    # no SLURM to be had here (no package source): exit 2, the tests' reason to skip
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurmctld slurmd slurm-client munge >/dev/null; } \
        || { echo "slurm: Debian's slurmctld, slurmd and munge cannot be installed" >&2; exit 2; }
fi
mkdir -p /run/munge /etc/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --force
S=$DIR/slurm
mkdir -p "$S/state"
cat > "$S/slurm.conf" <<CONF
ClusterName=mpinn-cluster
SlurmctldHost=$(hostname -s)(10.77.0.254)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool-%n
# the PMIx plugin makes its directories here; /tmp is shared by the nodes and they collide
TmpFS=$S/tmp-%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd-%n.log
SlurmctldPort=6827
SlurmdPort=6828
MinJobAge=600
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
for i in $(seq 1 "$NODES"); do
    echo "NodeName=node$i NodeAddr=10.77.0.$i CPUs=$(nproc --all) State=UNKNOWN" >> "$S/slurm.conf"
done
export SLURM_CONF=$S/slurm.conf
/usr/sbin/slurmctld -i
for i in $(seq 1 "$NODES"); do
    mkdir -p "$S/spool-node$i" "$S/tmp-node$i"
    # nsenter --net, not ip netns exec: that remounts /sys, the cgroup mounts vanish and
    # slurmd dies ("Hybrid mode is not supported"). -D in the background: the PID is
    # slurmd's own (each exec replaces the one before), kept for cluster-down.sh
    ns=(--net="/run/netns/mpn$i")
    [ "$fs" = local ] || ns+=(--mount="$G/ns/mnt$i")  # the node's own /shared
    setsid nsenter "${ns[@]}" unshare --uts sh -c \
        "hostname node$i; exec /usr/sbin/slurmd -D -N node$i" \
        </dev/null >>"$S/slurmd-node$i.out" 2>&1 &
    echo $! > "$S/slurmd-node$i.started.pid"
done
for _ in $(seq 1 120); do
    if sinfo_idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "cluster-up: the SLURM nodes did not become idle; see $S/slurmctld.log and $S/slurmd-node*.log" >&2
exit 1
