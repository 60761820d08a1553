#!/usr/bin/env bash
# The benchmark session run on the lent GPU machine (16 cores, one H100): the method
# table on the GPU, the 2-core CPU round-time target on two dedicated cores, side by side.
# Usage: bash benchmarks/device_run.sh OUTDIR   (results also land in benchmarks/results/)
set -u
out=${1:?outdir}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
M=supervised,mean-teacher,ua-mt,cps,dtc,dtml,simcvd,random-forest,otsu
taskset -c 0-7 timeout 470 python3 benchmarks/benchmark.py --device cuda --jobs 8 --threads 1 \
  --methods $M --tag gpu > "$out/bench.log" 2>&1 &
taskset -c 8-11 timeout 470 python3 benchmarks/benchmark.py --device cuda --jobs 6 --threads 1 \
  --methods diffusion,diffusion-no-stage1 --tag gpu-diffusion > "$out/bench-diffusion.log" 2>&1 &
taskset -c 12-13 timeout 470 python3 benchmarks/annotator_curve.py --device cuda --jobs 3 \
  --threads 1 --tag gpu > "$out/curve.log" 2>&1 &
OMP_NUM_THREADS=2 timeout 470 python3 benchmarks/round_time.py --cores 14,15 --seeds 0 \
  --tag cpu2 > "$out/round.log" 2>&1 &
wait
