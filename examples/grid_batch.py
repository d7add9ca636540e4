"""Submit a grid of 200 jobs, wait for them all, print the best ten.

    python examples/grid_batch.py [EPOCHS]      # $TRAINYARD_URL, $TRAINYARD_API_KEY; EPOCHS: 3
"""
import itertools
import json
import sys
from pathlib import Path

from client import Client

base = json.loads((Path(__file__).parent / "quick.json").read_text())
epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
grid = itertools.product([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [16, 32, 64, 128, 256], [0.0, 0.2, 0.4, 0.5], [32, 64])
specs = [{**base, "name": f"grid lr={lr} units={u} dropout={d} batch={bs}", "epochs": epochs,
          "optimizer": {"name": "adam", "learning_rate": lr}, "data": {**base["data"], "batch_size": bs},
          "model": {"layers": [{"type": "dense", "units": u, "activation": "relu"},
                               {"type": "dropout", "rate": d}, {"type": "dense", "units": 10}]}}
         for lr, u, d, bs in grid]
with Client() as c:  # retries 429/503 and dropped connections; POSTs with an Idempotency-Key
    ids = [r["id"] for r in c.submit_many(specs) if r["id"]]  # batches of 500
    print(f"submitted {len(ids)} of {len(specs)} jobs")
    jobs = c.wait(ids, poll=2)  # one list request per cycle (per 500 unfinished jobs), never one per job
ranked = sorted((j for j in jobs.values() if j["best"]), key=lambda j: float(j["best"]["value"]))
print(f"{'job':32}  {'status':9}  {'val_loss':>8}  name")
for j in ranked[:10]:
    print(f"{j['id']:32}  {j['status']:9}  {float(j['best']['value']):8.4f}  {j['name']}")
print(", ".join(f"{n} {s}" for s in ("succeeded", "failed", "cancelled")
                if (n := sum(j["status"] == s for j in jobs.values()))))
