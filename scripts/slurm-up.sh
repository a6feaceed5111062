#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine for the job-script tests:
#   scripts/slurm-up.sh DIR     -> prints "export SLURM_CONF=DIR/slurm.conf" on success
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (installed when missing,
# as root). Daemons run directly (no systemd); their PIDs go to DIR/*.pid for slurm-down.sh.
# Exit 2: SLURM cannot be had here (not root, no packages); any other failure is an error.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: slurm-up.sh DIR}")
[ "$(id -u)" -eq 0 ] || { echo "slurm-up: needs root" >&2; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    # no SLURM to be had here (no package source): exit 2, the tests' reason to skip
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurmctld slurmd slurm-client munge >/dev/null; } \
        || { echo "slurm: Debian's slurmctld, slurmd and munge cannot be installed" >&2; exit 2; }
fi
# A test cluster of this script left by a run killed before its teardown (its slurm.conf
# names the cluster mpinn-test) is stopped; any other SLURM on the machine is left alone.
for pid in $(pgrep -x slurmctld; pgrep -x slurmd); do
    conf=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | sed -n 's/^SLURM_CONF=//p')
    if [ -n "$conf" ] && grep -qx 'ClusterName=mpinn-test' "$conf" 2>/dev/null; then
        echo "slurm-up: stopping a leftover mpinn-test daemon (pid $pid, $conf)" >&2
        kill "$pid" 2>/dev/null || true
    fi
done
for _ in $(seq 1 50); do
    pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
    sleep 0.1
done
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    echo "slurm-up: a slurmctld or slurmd is already running on this machine" >&2
    exit 3
fi
mkdir -p "$DIR/state" "$DIR/spool" /run/munge /etc/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged --force
fi
host=$(hostname -s)
cat > "$DIR/slurm.conf" <<CONF
ClusterName=mpinn-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MinJobAge=600
NodeName=$host CPUs=$(nproc --all) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF="$DIR/slurm.conf"
/usr/sbin/slurmctld -i
/usr/sbin/slurmd
for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm-up: node did not become idle; see $DIR/slurmctld.log and $DIR/slurmd.log" >&2
exit 1
