#!/usr/bin/env bash
# Every GPU check and benchmark of the engine and of fused trials in one go, for a session lent a
# GPU machine (not CI; a lease is short, so this runs the steps in order of importance, each
# under its own time limit, and writes each step's output as soon as it ends).
#
#   bench/gpu_session.sh OUTDIR [OLD_TREE]
#
# Steps: bench/gpu_smoke.py (correctness on CUDA, the fused pack's hand-written gradients among
# them); bench/engine.py --device cuda (engine, engine without its non-finite check, plain loop);
# bench/fused.py --device cuda (27 trials solo vs fused, in-process); bench/packing.py --device cuda
# (packed vs solo through `trainyard serve`: needs the service's packages, carried as wheels made
# by bench/gpu_wheels.sh); with OLD_TREE (a copy of an earlier commit), bench/engine.py from there
# for a before/after; last, cProfiles of the engine and the plain loop on CUDA. STEPS
# (comma-separated: smoke, engine, fused, packing, engine_old, profile; default all) picks steps
# for a rerun. OUTDIR gets session.log (every step's output) and the steps' JSON files. PYTHON
# (default python3) runs them; STEP_SCALE (default 1) multiplies each step's time limit.
# On an H100 (2026-12-06) the steps took: smoke 39 s, engine > 150 s (then with 2 threads too),
# fused 80 s, packing 130 s for its sweep and ASHA parts, engine_old 113 s, profile 17 s: about
# 10 minutes in all, of a lease of 15 (the machine's start took ~30 s).
set -u
OUT=${1:?usage: bench/gpu_session.sh OUTDIR [OLD_TREE]}
OLD=${2:-}
PY=${PYTHON:-python3}
SCALE=${STEP_SCALE:-1}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG="$OUT/session.log"

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, its whole output appended to LOG
  local name=$1 limit=$(( $2 * SCALE )) t0=$SECONDS rc
  shift 2
  [ -z "${STEPS:-}" ] || [[ ",$STEPS," == *",$name,"* ]] || return 0
  echo "== $name ($*), limit ${limit}s" >> "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "== $name: rc=$rc in $(( SECONDS - t0 )) s" >> "$LOG"
  echo "== $name: rc=$rc in $(( SECONDS - t0 )) s"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
  nproc; } 2>&1 | tee -a "$LOG"

step smoke 180 "$PY" bench/gpu_smoke.py --json "$OUT/smoke.json"
step engine 200 "$PY" bench/engine.py --device cuda --only plain,engine,engine_nocheck --rounds 5 --ab-pairs 5 --threads 1 --json "$OUT/engine.json"
step fused 150 "$PY" bench/fused.py --device cuda --rounds 2 --json "$OUT/fused.json"
if "$PY" -c "import api.app, worker.main, client.cli" >> "$LOG" 2>&1; then
  step packing 300 "$PY" bench/packing.py --device cuda --warm --json "$OUT/packing.json"
else
  echo "== packing: skipped (the service does not import: see the traceback above)" | tee -a "$LOG"
fi
if [ -n "$OLD" ]; then
  step engine_old 120 bash -c "cd '$OLD' && '$PY' bench/engine.py --device cuda --only plain,engine --rounds 5 --ab-pairs 5 --threads 1"
fi
step profile 90 "$PY" bench/engine.py --device cuda --profile --workloads small --epochs 20
echo "== done" | tee -a "$LOG"
