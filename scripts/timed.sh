#!/usr/bin/env bash
# timed.sh NAME COMMAND...: run one stage of `make test`, then print how long it took
# (and its exit status when it failed), so a slow stage shows in every run's log.
name=$1; shift
start=$(date +%s)
"$@"
status=$?
took=$(( $(date +%s) - start ))
if [ "$status" -eq 0 ]; then
    echo "== stage $name: ${took} s"
else
    echo "== stage $name: ${took} s, FAILED (exit $status)"
fi
exit "$status"
