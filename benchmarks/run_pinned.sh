#!/usr/bin/env bash
# Run several tune_defaults.py configurations side by side, each pinned to its own 2 cores
# (a laptop-sized CPU budget per run). Usage: bash benchmarks/run_pinned.sh OUTDIR < configs
# where each line of configs holds the arguments of one tune_defaults.py run.
set -u
out=${1:?outdir}
mkdir -p "$out"
i=0
while IFS= read -r line; do
  [ -z "$line" ] && continue
  cores="$((2 * i)),$((2 * i + 1))"
  taskset -c "$cores" python3 benchmarks/tune_defaults.py $line > "$out/run$i.jsonl" 2> "$out/run$i.err" &
  i=$((i + 1))
done
wait
