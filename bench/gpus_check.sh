#!/usr/bin/env bash
# GPU check of `trainyard worker --gpus` (issue 14), for a machine with NVIDIA GPUs; the CPU tests
# (tests/service/test_gpus.py) fake the device list. Embedded SQLite + SQLAlchemy broker, so it
# needs no PostgreSQL or Redis. Prints what each child saw, kills one child and shows it restarted.
#
#   bench/gpus_check.sh            # every GPU PyTorch sees
#   bench/gpus_check.sh 0,1        # these
#   PYTHON=/path/to/python bench/gpus_check.sh
# Exit 0 when every child saw exactly its own device (CUDA_VISIBLE_DEVICES=g, torch sees 1 GPU)
# and the killed child came back pinned to the same device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=$(mktemp -d)
export TRAINYARD_DATA_DIR="$DATA" TRAINYARD_DATABASE_URL="sqlite:///$DATA/trainyard.db" \
       TRAINYARD_BROKER_URL="sqla+sqlite:///$DATA/broker.sqlite" TRAINYARD_AUTH=off
GPUS=${1:-$("$PY" -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")}
[ -n "$GPUS" ] || { echo "no GPU visible to PyTorch"; exit 1; }
N=$(echo "$GPUS" | tr ',' '\n' | grep -c .)
"$PY" -m client.cli migrate >/dev/null
LOG="$DATA/supervisor.log"
"$PY" -m client.cli worker --queues gpu --gpus "$GPUS" >"$LOG" 2>&1 &
SUP=$!
trap 'kill -TERM $SUP 2>/dev/null; wait $SUP 2>/dev/null || true' EXIT

wait_for() {  # wait_for COUNT PATTERN: until COUNT lines of the log match
  for _ in $(seq 1 600); do
    [ "$(grep -c "$2" "$LOG" || true)" -ge "$1" ] && return 0
    kill -0 $SUP 2>/dev/null || { cat "$LOG"; echo "supervisor exited"; exit 1; }
    sleep 0.5
  done
  cat "$LOG"; echo "timed out waiting for $1 x '$2'"; exit 1
}

wait_for "$N" "torch sees"
echo "== what each child saw"
grep -E "started gpu|torch sees" "$LOG"
BAD=$(grep "torch sees" "$LOG" | grep -vc "torch sees 1 CUDA" || true)
FIRST=$(grep -m1 -oE "started gpu[0-9]+ \(pid [0-9]+" "$LOG")
NAME=$(echo "$FIRST" | grep -oE "gpu[0-9]+"); PID=$(echo "$FIRST" | grep -oE "[0-9]+$")
echo "== killing $NAME (pid $PID)"
kill -KILL "$PID"
wait_for 2 "started $NAME "
wait_for "$((N + 1))" "torch sees"
grep -E "exited with status|started $NAME|torch sees" "$LOG" | tail -n 3
[ "$BAD" -eq 0 ] || { echo "FAIL: $BAD child(ren) saw more or fewer than one GPU"; exit 1; }
echo "OK: $N child(ren), one GPU each; $NAME restarted"
