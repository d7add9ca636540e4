"""Benchmark: 27 same-shape trials trained as one fused model against one after another. Issue 13.

Usage (repo root, in the venv; needs nothing running)::

    python bench/fused.py                                  # 27 trials x 27 epochs on the CPU
    python bench/fused.py --device cuda --rounds 3         # on a GPU
    python bench/fused.py --trials 8 --epochs 5 --json bench/out/fused.json

The trials are the digits MLP of ``bench/sweeps.py`` (64 relu units, dropout, 10 logits, batch 64,
Adam) with the learning rate (log-uniform 1e-4..3e-2), ``beta_1`` (0.8..0.95), an L2 kernel
penalty (log-uniform 1e-5..1e-2 on the hidden layer), the dropout rate (0..0.5) and the kernel
initializer (glorot_uniform, he_normal, lecun_normal) drawn per trial from a seeded RNG; each has
its own seed. Both contenders run in this process, alternately (``--rounds`` times, order
rotated): **solo** is ``training.fit`` on each spec one after another, **fused** is
``training.fused.fit_fused`` on all of them (one pack). Both include validating the specs,
splitting the data, per-epoch validation and callbacks; neither has a reporter. Printed: seconds
per round and the median ratio fused / solo (goal: <= 0.2 on CPU, <= 0.05 on a GPU).
The script also checks that the pack was really fused (no fallback) and prints the largest
relative difference of the final validation loss between a fused trial and its solo run (not 0
with dropout on: a pack draws its dropout masks for all trials at once).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.specs import digits_mlp  # noqa: E402 - after the path insert (run as a script)

BASE: dict[str, Any] = digits_mlp("bench-fused")

INITIALIZERS = ["glorot_uniform", "he_normal", "lecun_normal"]


def make_specs(n: int, epochs: int, device: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    specs = []
    for k in range(n):
        s = copy.deepcopy(BASE)
        s["seed"], s["epochs"], s["device"] = k, epochs, device
        s["optimizer"] = {"name": "adam", "learning_rate": float(10 ** rng.uniform(-4, np.log10(3e-2))),
                          "beta_1": float(rng.uniform(0.8, 0.95))}
        hidden = s["model"]["layers"][0]
        hidden["kernel_regularizer"] = {"l2": float(10 ** rng.uniform(-5, -2))}
        hidden["kernel_initializer"] = INITIALIZERS[int(rng.integers(len(INITIALIZERS)))]
        s["model"]["layers"][1]["rate"] = float(rng.uniform(0.0, 0.5))
        specs.append(s)
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=27)
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: one worker's share)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the hyperparameter draws")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    import training
    from training.fused import fit_fused

    torch.set_num_threads(args.threads)
    specs = make_specs(args.trials, args.epochs, args.device, args.seed)

    def solo() -> list[Any]:
        return [training.fit(s) for s in specs]

    def fused() -> list[Any]:
        results = fit_fused(specs)
        if not all(r.info["pack"]["fused"] for r in results):
            raise SystemExit(f"the pack fell back to solo runs: {results[0].info['pack']}")
        return results

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up (torch's first-call costs, the data set's first load) outside the timed rounds
    warm = make_specs(2, 1, args.device, args.seed)
    training.fit(warm[0])
    fit_fused(warm)
    times: dict[str, list[float]] = {"solo": [], "fused": []}
    last: dict[str, list[Any]] = {}
    for r in range(args.rounds):
        order = [("solo", solo), ("fused", fused)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            sync()
            t0 = time.perf_counter()
            last[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1} {name:5s} {times[name][-1]:8.2f} s", flush=True)
    ratios = [f / s for f, s in zip(times["fused"], times["solo"], strict=True)]
    diffs = [
        abs(f.history[-1]["val_loss"] - s.history[-1]["val_loss"]) / abs(s.history[-1]["val_loss"])
        for f, s in zip(last["fused"], last["solo"], strict=True)
    ]
    out = {
        "trials": args.trials,
        "epochs": args.epochs,
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "solo_s": times["solo"],
        "fused_s": times["fused"],
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "max_rel_diff_final_val_loss": max(diffs),
    }
    print(f"solo  median {statistics.median(times['solo']):.2f} s  ({args.trials} trials x {args.epochs} epochs, one after another)")
    print(f"fused median {statistics.median(times['fused']):.2f} s  (one pack)")
    print(f"fused / solo = {out['ratio_median']:.3f}  (goal <= 0.2 on CPU, <= 0.05 on a GPU)")
    print(f"largest relative difference of a trial's final val_loss, fused vs solo (dropout on): {max(diffs):.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
