"""Benchmark: packed jobs (issue 13) against today's one-job-at-a-time path, through the service.

Usage (repo root, in the venv; needs nothing running)::

    python bench/packing.py                                    # the issue's sizes: 27 x 27 sweeps, 200-job batch
    python bench/packing.py --epochs 5 --batch 60 --batch-epochs 2   # shorter (a busy machine)
    python bench/packing.py --parts asha --json bench/out/packing-asha.json   # one part only
    python bench/packing.py --warm --rounds 3                  # each part 3 times, the median ratio
    python bench/packing.py --warm --device cuda               # the jobs on the GPU (a GPU machine)

Parts (``--parts``, in this order; default all three):

- **sweep**: ``POST /v1/sweeps``, method random, 27 trials (``--trials``), all ready at once
  (``max_concurrent`` = trials), of the digits MLP (64 relu units, dropout, 10 logits, batch 64,
  Adam, 27 epochs: ``--epochs``) with the learning rate, ``beta_1``, the hidden layer's L2
  penalty, the dropout rate and the kernel initializer drawn per trial. Timed from the POST until
  the sweep's status is terminal (its ``finished_at``, see below).
- **asha**: the same sweep (same seed, so the same configurations) with ASHA early termination
  (``min_epochs`` 1, reduction factor 3): the base rung's trials are queued together and packed;
  the trials ASHA promotes together resume together as a pack, each from its own snapshot (one
  promoted alone runs alone). ``--timeline`` prints where each sweep's time went: its packs and
  solo runs, from the trials' events.
- **batch**: ``POST /v1/jobs/batch`` of 200 same-shape jobs (``--batch``; own seeds and rates, 3
  epochs each, ``--batch-epochs``), timed from the POST until every job is terminal (the last
  ``finished_at``): jobs per minute.

Each part's time ends at the server's own record of its end (the sweep's ``finished_at``; the
batch's last job's), on the machine's one clock, read by a poll every 0.5 s (``POLL_S``, ``--poll``;
the client's own waits poll every 1 s). Until 2026-12-06's eighth session the time ended when a poll
every 50 ms (sweeps) or 0.1 s (the batch) saw the end: up to that much later, and the polls
(~4 ms of the API's time each for a 27-trial sweep) ran beside the worker on this 2-core machine.
The time a poll saw the end is printed too (``seen_s`` in the JSON).

Each part runs in both modes, back to back: **solo** (``TRAINYARD_PACK=0``, today's path: one
job after another) then **packed** (``TRAINYARD_PACK=1``), each on its own ``trainyard serve``
(API + one worker + SQLite + the embedded broker, exactly as a user runs it; same worker count)
on a fresh data directory (``--warm``: after one 1-epoch job of the same model and a 1-trial
ASHA sweep of it have run there, so the worker's first-use costs are paid before the timed part,
in both modes). So each part's ratio (packed / solo wall time; packed / solo jobs per
minute) is measured side by side, and a part's figures are printed (and written to ``--json``) as
soon as it is done. With ``--rounds N`` each part is measured N times, the order of the two
modes alternating (solo first, then packed first, ...), and the median of the N ratios is the
part's figure (``ratio`` in the JSON; each round's under ``rounds``). The load average (``os.getloadavg``, 1 minute) before and after each mode is
printed with the figures: on a shared machine, quote it with them.

Both modes' workers follow the server's thread rule (``TRAINYARD_TORCH_ONE_THREAD_BELOW``: a job
or a pack's epoch whose step is small trains on one intra-op thread, ``training/threads.py``);
``--one-thread-below 0`` measures both modes without it, as every run before 2026-12-06's
seventh session did.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.specs import digits_mlp  # noqa: E402 - after the path insert (run as a script)

BASE: dict[str, Any] = digits_mlp("bench-packing", l2=1e-4)

SPACE: dict[str, Any] = {
    "optimizer.learning_rate": {"distribution": "log_uniform", "min": 1e-4, "max": 3e-2},
    "optimizer.beta_1": {"distribution": "uniform", "min": 0.8, "max": 0.95},
    "model.layers[0].kernel_regularizer.l2": {"distribution": "log_uniform", "min": 1e-5, "max": 1e-2},
    "model.layers[1].rate": {"distribution": "uniform", "min": 0.0, "max": 0.5},
    "model.layers[0].kernel_initializer": {"values": ["glorot_uniform", "he_normal", "lecun_normal"]},
}

TERMINAL = ("succeeded", "failed", "cancelled")


class Serve:
    """``trainyard serve`` on a free port and a fresh data directory."""

    def __init__(self, pack: bool, data_dir: Path, torch_threads: int = 0, pack_max_members: int = 0,
                 one_thread_below: int | None = None) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                   TRAINYARD_PACK="1" if pack else "0")
        if torch_threads:
            env["TRAINYARD_TORCH_THREADS"] = str(torch_threads)
        if pack_max_members:
            env["TRAINYARD_PACK_MAX_MEMBERS"] = str(pack_max_members)
        if one_thread_below is not None:
            env["TRAINYARD_TORCH_ONE_THREAD_BELOW"] = str(one_thread_below)
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = (data_dir.parent / f"serve-{'packed' if pack else 'solo'}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(self.port),
                                      "--data-dir", str(data_dir)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"trainyard serve exited ({self.log.name}):\n{tail}")
            time.sleep(0.5)
        raise RuntimeError("trainyard serve did not get ready in 120 s")

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_sweep(srv: Serve, trials: int, epochs: int, asha: bool) -> dict[str, Any]:
    base = copy.deepcopy(BASE)
    base["epochs"] = epochs
    body: dict[str, Any] = {"name": "bench-packing", "base": base, "method": "random", "parameters": SPACE,
                            "objective": {"metric": "val_accuracy", "mode": "max"}, "max_trials": trials,
                            "max_concurrent": trials, "seed": 7}
    if asha:
        body["early_termination"] = {"type": "asha", "min_epochs": 1, "reduction_factor": 3}
    t0, wall0 = time.perf_counter(), time.time()
    r = srv.http.post("/v1/sweeps", json=body)
    r.raise_for_status()
    post_s = time.perf_counter() - t0
    sweep_id = r.json()["id"]
    while True:
        sw = srv.http.get(f"/v1/sweeps/{sweep_id}").json()
        if sw["status"] in TERMINAL:
            break
        time.sleep(POLL_S)
    seen_s = time.perf_counter() - t0
    seconds = _at(sw["finished_at"]) - wall0
    trials = [t["job_id"] for t in sw["leaderboard"]]
    packed = sum(bool((srv.http.get(f"/v1/jobs/{i}").json().get("info") or {}).get("pack", {}).get("fused")) for i in trials)
    best = (sw.get("best_trial") or {}).get("value")
    return {"seconds": seconds, "seen_s": seen_s, "post_s": post_s, "status": sw["status"], "trials": len(trials),
            "trials_packed": packed, "best": best, "runs": timeline(srv.data_dir / "trainyard.db", trials)}


#: how often the benchmark asks whether a part has ended (the client's own waits ask every 1 s)
POLL_S = 0.5


def _at(iso: str) -> float:
    """A server timestamp (ISO 8601, UTC) as ``time.time()`` seconds: the machine's one clock."""
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def timeline(db: Path, job_ids: list[str]) -> list[dict[str, Any]]:
    """Where a sweep's time went, from its trials' events (the server's SQLite file): each run of a
    trial (a ``running`` state event to the next state event) grouped into the pack it ran in
    (its ``pack`` event) or alone: start and end in seconds from the first trial's first event,
    members, epochs trained by each, and how each run ended."""
    import sqlite3
    from datetime import datetime

    marks = ",".join("?" * len(job_ids))
    with sqlite3.connect(db) as con:
        rows = con.execute(f"SELECT job_id, kind, data, created_at FROM job_events WHERE job_id IN ({marks}) "
                           "AND kind IN ('state', 'epoch', 'pack') ORDER BY id", job_ids).fetchall()
    t = [datetime.fromisoformat(r[3]) for r in rows]
    t0 = min(t) if t else None
    runs: dict[str, dict[str, Any]] = {}
    last: dict[str, dict[str, Any]] = {}  # each job's latest run (its last epochs commit with its end)
    for (job_id, kind, data, _), at in zip(rows, t, strict=True):
        d = json.loads(data)
        sec = (at - t0).total_seconds()
        run = last.get(job_id)
        if kind == "state" and d.get("status") == "running":
            last[job_id] = {"job": job_id, "start": sec, "epochs": [], "pack": None, "ended": None}
        elif run is not None and kind == "pack":
            run["pack"] = d["pack"]
        elif run is not None and kind == "epoch":
            run["epochs"].append(int(d["epoch"]))
        elif run is not None and kind == "state" and run["ended"] is None:
            run["ended"] = d.get("status")
            key = run["pack"] or job_id + f"@{run['start']:.3f}"
            group = runs.setdefault(key, {"pack": run["pack"], "start": run["start"], "end": sec, "members": []})
            group["start"], group["end"] = min(group["start"], run["start"]), max(group["end"], sec)
            group["members"].append(run)
    return sorted(runs.values(), key=lambda g: g["start"])


def print_timeline(runs: list[dict[str, Any]]) -> None:
    for g in runs:
        eps = sorted({len(m["epochs"]) for m in g["members"]})
        first = min((m["epochs"][0] for m in g["members"] if m["epochs"]), default=0)
        last = max((m["epochs"][-1] for m in g["members"] if m["epochs"]), default=0)
        what = f"pack of {len(g['members'])}" if g["pack"] else "alone"
        print(f"        {g['start']:6.2f}-{g['end']:6.2f} s ({g['end'] - g['start']:5.2f} s) {what:>11}: epochs {first}-{last} "
              f"({'/'.join(map(str, eps))} each), ended {sorted({m['ended'] for m in g['members']})}", flush=True)


def run_batch(srv: Serve, n: int, epochs: int) -> dict[str, Any]:
    specs = []
    for k in range(n):
        s = copy.deepcopy(BASE)
        s.update(name=f"bench-batch-{k}", seed=k, epochs=epochs)
        s["optimizer"] = {"name": "adam", "learning_rate": 1e-3 * (1 + k % 10)}
        specs.append(s)
    t0, wall0 = time.perf_counter(), time.time()
    ids = []
    for lo in range(0, n, 1000):
        r = srv.http.post("/v1/jobs/batch", json={"jobs": specs[lo:lo + 1000]})
        r.raise_for_status()
        ids += [x["id"] for x in r.json()["results"]]
    post_s = time.perf_counter() - t0
    # one request per cycle for the jobs not yet ended (what the client's wait(ids) asks): a GET
    # per job per cycle loaded the API beside the worker and stretched the last cycle
    pending = list(ids)
    last_end = 0.0
    while pending:
        r = srv.http.post("/v1/jobs/query", json={"ids": pending})
        r.raise_for_status()
        ended = {j["id"]: j for j in r.json()["jobs"] if j["status"] in TERMINAL}
        last_end = max([last_end, *(_at(j["finished_at"]) for j in ended.values())])
        pending = [i for i in pending if i not in ended]
        if pending:
            time.sleep(POLL_S)
    seen_s = time.perf_counter() - t0
    seconds = last_end - wall0
    statuses: dict[str, int] = {}
    packed = 0
    for job_id in ids:  # after the clock stopped
        j = srv.http.get(f"/v1/jobs/{job_id}").json()
        statuses[j["status"]] = statuses.get(j["status"], 0) + 1
        packed += bool((j.get("info") or {}).get("pack", {}).get("fused"))
    return {"seconds": seconds, "seen_s": seen_s, "post_s": post_s, "jobs_per_minute": n / seconds * 60,
            "statuses": statuses, "packed": packed}


PARTS = ("sweep", "asha", "batch")


def warm_up(srv: Serve) -> None:
    """One 1-epoch job of the same model, alone (``"pack": false``), then a 1-trial ASHA sweep of
    it (2 epochs, alone), each run to its end before the timed part: the worker has then paid its
    first-use costs (torch and scikit-learn imports, the dataset's first load; Optuna's import for
    the sweep's first pruning decision, the API's for its first suggestion), as a worker that has
    been up for a while has."""
    spec = dict(copy.deepcopy(BASE), name="bench-warm-up", epochs=1, pack=False, seed=0)
    r = srv.http.post("/v1/jobs", json=spec)
    r.raise_for_status()
    job_id = r.json()["id"]
    while srv.http.get(f"/v1/jobs/{job_id}").json()["status"] not in TERMINAL:
        time.sleep(0.05)
    r = srv.http.post("/v1/sweeps", json={
        "name": "bench-warm-up", "base": dict(spec, epochs=2), "method": "random", "parameters": SPACE,
        "objective": {"metric": "val_accuracy", "mode": "max"}, "max_trials": 1, "max_concurrent": 1, "seed": 1,
        "early_termination": {"type": "asha", "min_epochs": 1, "reduction_factor": 3}})
    r.raise_for_status()
    sweep_id = r.json()["id"]
    while srv.http.get(f"/v1/sweeps/{sweep_id}").json()["status"] not in TERMINAL:
        time.sleep(0.05)


def run_part(part: str, pack: bool, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    srv = Serve(pack, data_dir, args.torch_threads, args.pack_max_members, args.one_thread_below)
    try:
        if args.warm:
            warm_up(srv)
        load_before = os.getloadavg()[0]
        if part == "batch":
            out = run_batch(srv, args.batch, args.batch_epochs)
        else:
            out = run_sweep(srv, args.trials, args.epochs, part == "asha")
    finally:
        srv.close()
    out["load"] = [load_before, os.getloadavg()[0]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--trials", type=int, default=27)
    ap.add_argument("--epochs", type=int, default=27, help="epochs of each sweep trial")
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--batch-epochs", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="TRAINYARD_TORCH_THREADS for both modes' worker (0: torch's default, one per core)")
    ap.add_argument("--one-thread-below", type=int, default=None,
                    help="TRAINYARD_TORCH_ONE_THREAD_BELOW for both modes' worker (0: every job on torch's "
                         "threads, as before 2026-12-06's seventh session; default: the server's)")
    ap.add_argument("--pack-max-members", type=int, default=0,
                    help="TRAINYARD_PACK_MAX_MEMBERS for the packed mode's server (0: the server's default)")
    ap.add_argument("--warm", action="store_true",
                    help="in both modes, run a 1-epoch job and a 1-trial sweep to their end before the timed part (a worker that has been up a while)")
    ap.add_argument("--timeline", action="store_true",
                    help="print each sweep's runs (packs and solo runs: when, how many members, which epochs), from its events")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each part this many times (solo and packed each on a fresh server, the order "
                         "alternating) and report each round's ratio and their median: this machine is noisy")
    ap.add_argument("--device", default="cpu", help="the jobs' device: cpu (default), cuda (on a GPU machine)")
    ap.add_argument("--poll", type=float, default=0.5,
                    help="seconds between the polls that wait for a part's end (0.05: as before 2026-12-06's eighth session)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    global POLL_S  # noqa: PLW0603 - a module setting the run's parts read
    POLL_S = args.poll
    BASE["device"] = args.device
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--parts: comma-separated, of {', '.join(PARTS)}")

    out: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        for part in parts:
            res: dict[str, Any] = {"rounds": []}
            for k in range(args.rounds):
                # alternate which mode goes first, so a drift of the machine's speed weighs on both
                modes = ("solo", "packed") if k % 2 == 0 else ("packed", "solo")
                rnd: dict[str, Any] = {}
                for mode in modes:
                    r = rnd[mode] = run_part(part, mode == "packed", Path(tmp) / part / f"{k}-{mode}" / "data", args)
                    print_run(part, mode, r, args.timeline)
                rnd["ratio"] = ratio(part, rnd["solo"], rnd["packed"])
                res["rounds"].append(rnd)
                print(f"{part:>5}: {RATIO[part]} {shown(part, rnd['ratio'])}" + (f" (round {k + 1} of {args.rounds})" if args.rounds > 1 else "")
                      + f" (goal {GOAL[part]})", flush=True)
            res["ratio"] = statistics.median(r["ratio"] for r in res["rounds"])
            res["solo"], res["packed"] = res["rounds"][0]["solo"], res["rounds"][0]["packed"]
            if args.rounds > 1:
                each = ", ".join(shown(part, r["ratio"]) for r in res["rounds"])
                print(f"{part:>5}: {RATIO[part]} median of {args.rounds} rounds {shown(part, res['ratio'])} "
                      f"({each}; goal {GOAL[part]})", flush=True)
            out[part] = res
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(out, indent=2))


RATIO = {"sweep": "wall time packed/solo", "asha": "wall time packed/solo", "batch": "jobs/min packed/solo"}
GOAL = {"sweep": "<= 0.2 on CPU, <= 0.05 on a GPU", "asha": "<= 0.2 on CPU, <= 0.05 on a GPU", "batch": ">= 5x"}


def ratio(part: str, solo: dict[str, Any], packed: dict[str, Any]) -> float:
    """A part's figure: packed / solo jobs per minute (batch), packed / solo wall time (sweeps)."""
    if part == "batch":
        return packed["jobs_per_minute"] / solo["jobs_per_minute"]
    return packed["seconds"] / solo["seconds"]


def shown(part: str, value: float) -> str:
    return f"{value:.2f}x" if part == "batch" else f"{value:.3f}"


def print_run(part: str, mode: str, r: dict[str, Any], show_timeline: bool) -> None:
    load = f"load {r['load'][0]:.1f} -> {r['load'][1]:.1f}"
    post = f"the POST {r['post_s'] * 1000:.0f} ms of it; seen by a poll at {r['seen_s']:.2f} s"
    if part == "batch":
        print(f"{part:>5} {mode:>6}: {r['seconds']:.2f} s = {r['jobs_per_minute']:.1f} jobs/min "
              f"({r['statuses']}, {r['packed']} packed; {post}); {load}", flush=True)
        return
    print(f"{part:>5} {mode:>6}: {r['seconds']:.2f} s ({r['status']}, {r['trials']} trials, "
          f"{r['trials_packed']} packed, best {r['best']}; {post}); {load}", flush=True)
    if show_timeline:
        print_timeline(r["runs"])


if __name__ == "__main__":
    main()
