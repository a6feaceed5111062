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
# With --slurm it also starts SLURM on the nodes (slurmctld here, one slurmd per node; Debian's
# packages and munge installed when missing) and writes slurm/slurm.conf: sbatch -N NODES
# with SLURM_CONF=$DIR/slurm/slurm.conf. Its ports (6827, 6828) differ from slurm-up.sh's.
# Undo with scripts/cluster-down.sh. Only 10.77.0.0/24 inside these namespaces is used;
# lo and eth0 of the machine are never touched.
set -euo pipefail
slurm=0
args=()
for arg in "$@"; do
    if [ "$arg" = --slurm ]; then slurm=1; else args+=("$arg"); fi
done
NODES=${args[0]:?usage: cluster-up.sh NODES [RATE] [--slurm]}
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

up_already() {
    [ "$(cat "$DIR/nodes" 2>/dev/null)" = "$NODES $RATE" ] || return 1
    ip link show mpnbr0 >/dev/null 2>&1 || return 1
    for i in $(seq 1 "$NODES"); do [ -e "/run/netns/mpn$i" ] || return 1; done
    [ "$slurm" = 0 ] || sinfo_idle
}
sinfo_idle() {  # every node of the SLURM cluster is idle (sinfo waits long for no slurmctld)
    [ -s "$DIR/slurm/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurm/slurmctld.pid")" 2>/dev/null \
        && [ "$(SLURM_CONF=$DIR/slurm/slurm.conf sinfo -h -o '%T %D' 2>/dev/null)" = "idle $NODES" ]
}
if up_already; then
    echo "cluster-up: $NODES nodes at $RATE already up; mpirun across them: $DIR/mpirun"
    [ "$slurm" = 0 ] || echo "export SLURM_CONF=$DIR/slurm/slurm.conf"
    exit 0
fi
bash "$HERE/cluster-down.sh" >/dev/null 2>&1 || true

# a namespace that cannot be made (no CAP_SYS_ADMIN in a container, no netns support) is a
# reason to skip, not an error
if ! why=$(ip netns add mpn1 2>&1) || ! why=$(ip link add mpnbr0 type bridge 2>&1); then
    ip netns del mpn1 2>/dev/null || true
    echo "cluster-up: cannot make network namespaces here: $why" >&2
    exit 2
fi
# from here on a failure leaves nothing half made
trap 'echo "cluster-up: failed (line $LINENO); taking down what was made" >&2
      bash "$HERE/cluster-down.sh"' ERR
mkdir -p "$DIR"
echo "$NODES $RATE" > "$DIR/nodes"
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

# Open MPI's rsh launcher calls AGENT HOST CMD... as it would ssh: CMD's words are one shell
# line, run here inside the node's namespace under the node's own hostname
cat > "$DIR/rsh" <<'AGENT'
#!/bin/sh
# rsh HOST CMD...: run CMD on cluster node HOST (10.77.0.I or nodeI), as ssh would
host=$1; shift
case $host in
    10.77.0.*) i=${host#10.77.0.} ;;
    node*) i=${host#node} ;;
    *) echo "rsh: $host is not a node of the mpinn cluster" >&2; exit 255 ;;
esac
[ -e "/run/netns/mpn$i" ] || { echo "rsh: no node $host (is the cluster up?)" >&2; exit 255; }
exec ip netns exec "mpn$i" unshare --uts sh -c "hostname node$i; $*"
AGENT
chmod 755 "$DIR/rsh"

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
chmod 755 "$DIR/mpirun"

echo "cluster-up: $NODES nodes at $RATE; mpirun across them: $DIR/mpirun"
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
    setsid nsenter --net="/run/netns/mpn$i" unshare --uts sh -c \
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
