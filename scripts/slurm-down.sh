#!/usr/bin/env bash
# Stop the daemons scripts/slurm-up.sh DIR started, by their PIDs (munged is left running).
DIR=$(realpath -m "${1:?usage: slurm-down.sh DIR}")
for name in slurmd slurmctld; do
    if [ -s "$DIR/$name.pid" ]; then kill "$(cat "$DIR/$name.pid")" 2>/dev/null || true; fi
done
