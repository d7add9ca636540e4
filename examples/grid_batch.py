"""Submit a grid of 200 jobs, wait for them all, print the best ten: python examples/grid_batch.py"""
import itertools
import json
import time
from pathlib import Path

from client import Client

base = json.loads((Path(__file__).parent / "quick.json").read_text())
grid = itertools.product([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], [16, 32, 64, 128, 256], [0.0, 0.2, 0.4, 0.5], [32, 64])
run = f"grid-{int(time.time())}"  # every job of this run has this name: one list request follows them all
specs = [{**base, "name": run, "epochs": 3, "optimizer": {"name": "adam", "learning_rate": lr},
          "data": {**base["data"], "batch_size": bs},
          "model": {"layers": [{"type": "dense", "units": u, "activation": "relu"},
                               {"type": "dropout", "rate": d}, {"type": "dense", "units": 10}]}}
         for lr, u, d, bs in grid]
with Client() as c:  # $TRAINYARD_URL, $TRAINYARD_API_KEY; retries 429/503 and dropped connections
    results = c.submit_many(specs)  # batches of 500, each with an Idempotency-Key
    print(f"submitted {sum(r['status'] == 'created' for r in results)} of {len(specs)} jobs")
    while (jobs := list(c.iter_jobs(name=run, page_size=500))) and any(
            j["status"] in ("queued", "running") for j in jobs):
        print(f"{sum(j['status'] not in ('queued', 'running') for j in jobs)}/{len(jobs)} done", end="\r")
        time.sleep(2)
ranked = sorted((j for j in jobs if j["best"]), key=lambda j: float(j["best"]["value"]))
print(f"\n{'job':34} {'status':10} {'stop reason':15} best val_loss")
for j in ranked[:10]:
    print(f"{j['id']:34} {j['status']:10} {j['stop_reason'] or '':15} {float(j['best']['value']):.4f}")
