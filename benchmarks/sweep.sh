#!/usr/bin/env bash
# Run many tune_defaults.py configurations side by side (one core and one torch thread
# each, all on one device) and collect their JSON lines.
# Usage: bash benchmarks/sweep.sh JOBS_FILE OUT.jsonl [PARALLEL] [DEVICE]
#   JOBS_FILE: one job per line, the tune_defaults.py arguments (e.g.
#   "--method diffusion --slices 1 --seed 0 --setting norm=batch --iterations 180").
set -u
jobs_file=${1:?jobs file}
out=${2:?output jsonl}
parallel=${3:-8}
device=${4:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
here=$(dirname "$0")
grep -v '^\s*\(#\|$\)' "$jobs_file" | nl -ba -w1 -s' ' |
  xargs -P "$parallel" -L 1 bash -c '
    core=$(( $0 % $(nproc) ))
    taskset -c $core python3 '"$here"'/tune_defaults.py --threads 1 --device '"$device"' "$@" \
      2>>'"$out"'.err | grep "^{" >> '"$out"'
  '
