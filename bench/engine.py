"""Benchmark: the Trainyard engine (``training.fit``) against a plain PyTorch loop, Keras 3 (torch
backend) ``fit()`` and Lightning's ``Trainer``, all doing the same work.

Usage (from the repo root, in the venv)::

    python bench/engine.py                         # CPU, 2 threads, 5 rounds, both workloads
    python bench/engine.py --rounds 9 --json out.json
    python bench/engine.py --device cuda --only engine,plain
    python bench/engine.py --device cuda --only plain,engine,engine_nocheck   # what the non-finite check costs
    python bench/engine.py --workloads small --profile   # cProfiles of the engine and the plain loop

Workloads
    small   MLP 64-64-10 on sklearn digits (the issue's target: engine <= 1.05x plain, memory <= 1.2x)
    large   MLP 64-1024-1024-10 (1.1M parameters; compute dominates: two big GEMMs per layer per
            step). An MLP rather than a CNN on 1x8x8 digits so the four contenders run exactly the
            same layers (no channels-first/last or 'same'-padding differences between Keras and
            torch), and because an 8x8 CNN would still be overhead-bound at a size that keeps the
            run short.

Same work everywhere: ``training.data.load`` of {digits, validation_split 0.2, standardize, seed 0};
data on the device as tensors (Lightning: TensorDataset DataLoaders, its idiomatic input; Keras:
the tensors passed to fit); shuffled every epoch; batch 64; Adam lr 1e-3, epsilon 1e-7 (Keras'
Adam, the engine's default formulas: the plain loop feeds torch's Adam Keras' epsilon-hat,
``eps = 1e-7 / sqrt(1 - 0.999**t)``, which is Keras' update; Lightning keeps torch's Adam); softmax
cross-entropy on logits; per-epoch training loss and accuracy and a per-epoch validation pass
(loss + accuracy) over the whole validation set in one batch. Glorot-uniform kernels, zero biases.

Method
    Each contender runs in its own fresh subprocess (so memory peaks don't mix) that imports its
    libraries, builds the data, then waits for commands. The parent runs interleaved rounds: each
    round runs every contender once, the order rotated each round; one untimed warm-up run per
    contender first. The timed region is one training call including model (and optimizer /
    Trainer / compile) construction; the one-time set-up (imports, first data load) is outside it
    for everyone. The engine's call also validates the spec and re-splits the data each time (it
    is what ``training.fit`` does); that in-call set-up is measured separately and printed.
    Memory (CPU): before each run the worker resets the kernel's peak-RSS mark
    (``/proc/self/clear_refs``), and after it reads the peak (VmHWM); the reported figure is the
    training peak minus the resident size just before the run (libraries and data excluded), from
    the warm-up run, i.e. the first training in a fresh process. Where the mark cannot be reset
    it falls back to ``ru_maxrss`` deltas. CUDA: ``torch.cuda.max_memory_allocated`` minus the
    memory allocated before the run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = str(Path(__file__).resolve().parent)
if sys.path and sys.path[0] == HERE:  # don't shadow anything with bench/engine.py itself
    sys.path.pop(0)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONTENDERS = ("plain", "engine", "engine_nocheck", "keras", "lightning")
OPTIONAL = {"keras": "keras", "lightning": "lightning"}
SEED = 0
BATCH = 64
LR = 1e-3
EPS = 1e-7
WORKLOADS: dict[str, dict[str, Any]] = {
    "small": {"hidden": [64], "title": "MLP 64-64-10"},
    "large": {"hidden": [1024, 1024], "title": "MLP 64-1024-1024-10"},
}
MARK = "@@BENCH "


def data_section() -> dict[str, Any]:
    return {"dataset": "digits", "validation_split": 0.2, "batch_size": BATCH, "shuffle": True, "standardize": True}


def engine_spec(hidden: list[int], epochs: int, device: str) -> dict[str, Any]:
    layers: list[dict[str, Any]] = [{"type": "dense", "units": h, "activation": "relu"} for h in hidden]
    layers.append({"type": "dense", "units": 10})
    return {
        "name": "bench",
        "seed": SEED,
        "device": device,
        "data": data_section(),
        "model": {"layers": layers},  # kernel_initializer glorot_uniform, bias zeros (Keras defaults)
        "loss": "sparse_categorical_crossentropy",
        "metrics": ["accuracy"],
        "optimizer": {"name": "adam", "learning_rate": LR, "epsilon": EPS},
        "epochs": epochs,
    }


# =============================================================================== worker side


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def torch_mlp(hidden: list[int], n_in: int, n_out: int) -> Any:
    """nn.Sequential built like the engine: each Linear constructed then glorot-uniform/zeros
    initialised in layer order (the same RNG draws, so the same initial weights)."""
    import torch
    from torch import nn

    mods: list[nn.Module] = []
    widths = [n_in, *hidden, n_out]
    for i in range(len(widths) - 1):
        lin = nn.Linear(widths[i], widths[i + 1])
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)
        mods.append(lin)
        if i < len(hidden):
            mods.append(nn.ReLU())
    del torch
    return nn.Sequential(*mods)


class Worker:
    """One contender in its own process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.contender: str = args.worker
        self.hidden: list[int] = WORKLOADS[args.workload]["hidden"]
        self.epochs: int = args.epochs
        import torch

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"

        from training import data as data_mod
        from training.spec import validate_spec

        job = validate_spec(engine_spec(self.hidden, self.epochs, args.device))
        split = data_mod.load(job.data, job.seed)
        self.n_classes = int(split.info.n_classes)
        self.x = torch.from_numpy(split.x_train).to(self.device)
        self.y = torch.from_numpy(split.y_train).to(self.device)
        self.xv = torch.from_numpy(split.x_val).to(self.device)
        self.yv = torch.from_numpy(split.y_val).to(self.device)
        self.n_in = int(self.x.shape[1])
        getattr(self, f"setup_{self.contender}")()
        self.torch_warmup()
        if self.cuda:
            torch.cuda.synchronize()

    def torch_warmup(self) -> None:
        """The same few torch steps in every worker before the memory baseline, so torch's
        one-time lazy initialisation (kernels, autograd engine, thread pools: ~100 MB of RSS on
        CPU) is not counted as any contender's training memory."""
        import torch
        import torch.nn.functional as F

        net = torch_mlp([8], self.n_in, self.n_classes).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=LR, eps=EPS)
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(1)).to(self.device)
        for b in range(2):
            idx = perm[b * BATCH : (b + 1) * BATCH]
            out = net(self.x[idx])
            loss = F.cross_entropy(out, self.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            net.eval()
            acc = (net(self.xv).argmax(dim=-1) == self.yv).sum()
        torch.stack([loss.detach().double(), acc.double()]).cpu().tolist()
        del net, opt, perm, out, loss, acc
        gc.collect()

    # ---------------------------------------------------------------- contenders

    def setup_plain(self) -> None:
        pass

    def run_plain(self) -> dict[str, Any]:
        """The hand-written loop: what the engine does, nothing more."""
        import random

        import numpy as np
        import torch
        import torch.nn.functional as F

        random.seed(SEED)
        np.random.seed(SEED)
        torch.manual_seed(SEED)
        dev = self.device
        model = torch_mlp(self.hidden, self.n_in, self.n_classes).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=LR, eps=EPS)
        group = opt.param_groups[0]
        t = 0
        g = torch.Generator().manual_seed(SEED)
        x, y, xv, yv = self.x, self.y, self.xv, self.yv
        n, nv = len(x), len(xv)
        steps = (n + BATCH - 1) // BATCH
        history = []
        for _ in range(self.epochs):
            model.train()
            perm = torch.randperm(n, generator=g).to(dev)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
            for b in range(steps):
                idx = perm[b * BATCH : (b + 1) * BATCH]
                xb, yb = x[idx], y[idx]
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t += 1
                group["eps"] = EPS / math.sqrt(1 - 0.999**t)  # Keras' epsilon-hat: Keras' Adam on torch's
                opt.step()
                loss_sum.add_(loss.detach(), alpha=len(idx))
                correct.add_((out.detach().argmax(dim=-1) == yb).sum())
            model.eval()
            with torch.no_grad():
                out = model(xv)
                vloss = F.cross_entropy(out, yv)
                vcorrect = (out.argmax(dim=-1) == yv).sum()
            tl, ta, vl, va = torch.stack([loss_sum * 1.0, correct.double(), vloss.double(), vcorrect.double()]).double().cpu().tolist()
            history.append({"loss": tl / n, "accuracy": ta / n, "val_loss": vl, "val_accuracy": va / nv})
        return {"history": history}

    def setup_engine(self) -> None:
        import training
        from training import engine  # noqa: F401  (first import outside the timed region)

        self.fit = training.fit
        self.spec = engine_spec(self.hidden, self.epochs, self.args.device)
        # The engine's per-call set-up that the other contenders do not repeat: spec validation,
        # the data split/standardize (raw digits are cached in-process) and the copy to device.
        from training import data as data_mod
        from training.spec import validate_spec

        validate_spec(self.spec)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            job = validate_spec(self.spec)
        t1 = time.perf_counter()
        for _ in range(reps):
            s = data_mod.load(job.data, job.seed)
            self.torch.from_numpy(s.x_train).to(self.device)
            self.torch.from_numpy(s.x_val).to(self.device)
        t2 = time.perf_counter()
        self.engine_setup = {"validate_s": (t1 - t0) / reps, "data_load_s": (t2 - t1) / reps}

    def run_engine(self) -> dict[str, Any]:
        res = self.fit(self.spec, reporter=None)
        keys = ("loss", "accuracy", "val_loss", "val_accuracy")
        return {"history": [{k: h[k] for k in keys} for h in res.history], "stop_reason": res.stop_reason}

    def setup_engine_nocheck(self) -> None:
        """The engine without its per-step non-finite-loss check (``terminate_on_nan: false``):
        what the check costs (on a GPU, one copy to pinned memory and one event a step)."""
        self.setup_engine()
        self.spec = dict(self.spec, callbacks={"terminate_on_nan": False})

    run_engine_nocheck = run_engine

    def setup_keras(self) -> None:
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras

        if keras.backend.backend() != "torch":
            raise RuntimeError(f"keras backend is {keras.backend.backend()!r}, not torch (set KERAS_BACKEND=torch)")
        self.keras = keras

    def run_keras(self) -> dict[str, Any]:
        keras = self.keras
        keras.utils.set_random_seed(SEED)
        layers: list[Any] = [keras.Input((self.n_in,))]
        layers += [keras.layers.Dense(h, activation="relu") for h in self.hidden]
        layers.append(keras.layers.Dense(self.n_classes))
        model = keras.Sequential(layers)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=LR, epsilon=EPS),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        h = model.fit(
            self.x, self.y, batch_size=BATCH, epochs=self.epochs, shuffle=True, verbose=0,
            validation_data=(self.xv, self.yv), validation_batch_size=len(self.xv),
        ).history
        keys = ("loss", "accuracy", "val_loss", "val_accuracy")
        return {"history": [{k: float(h[k][i]) for k in keys} for i in range(len(h["loss"]))]}

    def setup_lightning(self) -> None:
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        import lightning as L
        import torch
        import torch.nn.functional as F

        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)

        class LitMLP(L.LightningModule):
            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net

            def training_step(self, batch: Any, _i: int) -> torch.Tensor:
                x, y = batch
                out = self.net(x)
                loss = F.cross_entropy(out, y)
                acc = (out.detach().argmax(dim=-1) == y).float().mean()
                self.log("loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
                self.log("accuracy", acc, on_step=False, on_epoch=True, batch_size=len(y))
                return loss

            def validation_step(self, batch: Any, _i: int) -> None:
                x, y = batch
                out = self.net(x)
                self.log("val_loss", F.cross_entropy(out, y), on_epoch=True, batch_size=len(y))
                self.log("val_accuracy", (out.argmax(dim=-1) == y).float().mean(), on_epoch=True, batch_size=len(y))

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.Adam(self.parameters(), lr=LR, eps=EPS)

        self.L, self.LitMLP = L, LitMLP
        from torch.utils.data import DataLoader, TensorDataset

        # Lightning's idiom: DataLoaders over CPU tensors; the Trainer moves each batch to the device.
        xc, yc, xvc, yvc = (t.cpu() for t in (self.x, self.y, self.xv, self.yv))
        self.train_ds, self.val_ds = TensorDataset(xc, yc), TensorDataset(xvc, yvc)
        self.DataLoader = DataLoader

    def run_lightning(self) -> dict[str, Any]:
        import torch

        torch.manual_seed(SEED)
        g = torch.Generator().manual_seed(SEED)
        train = self.DataLoader(self.train_ds, batch_size=BATCH, shuffle=True, generator=g)
        val = self.DataLoader(self.val_ds, batch_size=len(self.val_ds))
        module = self.LitMLP(torch_mlp(self.hidden, self.n_in, self.n_classes))
        trainer = self.L.Trainer(
            max_epochs=self.epochs, accelerator="gpu" if self.cuda else "cpu", devices=1,
            enable_progress_bar=False, logger=False, enable_checkpointing=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(module, train, val)
        m = trainer.callback_metrics
        return {"final": {k: float(v) for k, v in m.items()}}

    # ---------------------------------------------------------------- protocol

    def measure(self) -> dict[str, Any]:
        torch = self.torch
        gc.collect()
        rec: dict[str, Any] = {}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            rss_before = _status_kb("VmRSS")
            reset = _reset_peak()
            maxrss_before = _maxrss_kb()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        out = getattr(self, f"run_{self.contender}")()
        if self.cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        rec["seconds"] = t1 - t0
        rec["cpu_seconds"] = time.process_time() - cpu0
        if self.cuda:
            rec["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            rec["mem_method"] = "cuda.max_memory_allocated - allocated before"
        else:
            hwm = _status_kb("VmHWM")
            if reset and hwm is not None and rss_before is not None:
                rec["peak_mb"] = (hwm - rss_before) / 1024
                rec["mem_method"] = "VmHWM (reset before run) - VmRSS before run"
            else:
                rec["peak_mb"] = (_maxrss_kb() - maxrss_before) / 1024
                rec["mem_method"] = "ru_maxrss delta"
            rec["rss_total_mb"] = (_status_kb("VmHWM") or _maxrss_kb()) / 1024
        rec.update(out)
        del out
        gc.collect()
        return rec

    def serve(self) -> None:
        info: dict[str, Any] = {"ready": True, "torch": self.torch.__version__, "threads": self.torch.get_num_threads()}
        if self.cuda:
            info["device_name"] = self.torch.cuda.get_device_name(self.device)
        if not self.cuda:
            info["rss_baseline_mb"] = (_status_kb("VmRSS") or 0) / 1024
        if hasattr(self, "engine_setup"):
            info["engine_setup"] = self.engine_setup
        if self.contender == "keras":
            info["version"] = self.keras.__version__
        if self.contender == "lightning":
            info["version"] = self.L.__version__
        _send(info)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "run":
                try:
                    _send(self.measure())
                except Exception as exc:  # report, keep serving
                    _send({"error": f"{type(exc).__name__}: {exc}"})
            elif cmd == "quit" or not cmd:
                return


def worker_main(args: argparse.Namespace) -> None:
    try:
        w = Worker(args)
    except Exception as exc:
        _send({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    w.serve()


# =============================================================================== parent side


class Child:
    def __init__(self, contender: str, workload: str, args: argparse.Namespace, logdir: Path) -> None:
        self.name = contender
        env = dict(os.environ)
        env.update({
            "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
            "KERAS_BACKEND": "torch", "KERAS_TORCH_DEVICE": args.device,
            "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
        })
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        self.log = logdir / f"{workload}-{contender}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", contender, "--workload", workload,
             "--epochs", str(args.epochs), "--device", args.device, "--threads", str(args.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=env, cwd=str(ROOT),
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        tail = self.log.read_text()[-1500:] if self.log.exists() else ""
        return {"ready": False, "error": f"worker exited (rc={self.proc.wait()}); log tail:\n{tail}"}

    def run(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def bench_workload(workload: str, contenders: list[str], args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    hidden = WORKLOADS[workload]["hidden"]
    widths = [64, *hidden, 10]
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=False))
    print(f"\n== {WORKLOADS[workload]['title']} ({params:,} parameters) on digits: 1437 train / 360 val, batch {BATCH}, "
          f"23 steps/epoch, {args.epochs} epochs, Adam, {args.device}, {args.threads} threads, {args.rounds} rounds", flush=True)
    children: dict[str, Child] = {}
    infos: dict[str, dict[str, Any]] = {}
    # Start the workers one at a time (imports are CPU-heavy; don't let them overlap a timing).
    for c in contenders:
        ch = Child(c, workload, args, logdir)
        info = ch.read()
        if not info.get("ready"):
            print(f"  note: {c} skipped: {info.get('error', 'worker failed')}", flush=True)
            ch.close()
            continue
        children[c], infos[c] = ch, info
    names = list(children)
    first = next(iter(infos.values()), {})
    print(f"  torch {first.get('torch', '?')}" + (f", {first['device_name']}" if "device_name" in first else ""), flush=True)
    warm: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in names}
    try:
        for c in names:  # warm-up: the first training in a fresh process (its memory peak is reported)
            warm[c] = children[c].run()
            if "error" in warm[c]:
                print(f"  note: {c} failed its warm-up run: {warm[c]['error']}", flush=True)
        names = [c for c in names if "error" not in warm[c]]
        for r in range(args.rounds):
            k = r % len(names) if names else 0
            order = names[k:] + names[:k]
            for c in order:
                rec = children[c].run()
                if "error" in rec:
                    print(f"  note: {c} failed in round {r + 1}: {rec['error']}", flush=True)
                    continue
                runs[c].append(rec)
            done = "  ".join(f"{c} {runs[c][-1]['seconds']:.3f}s" for c in order if runs[c])
            print(f"  round {r + 1}/{args.rounds}: {done}   (load average {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for ch in children.values():
            ch.close()

    rows: dict[str, dict[str, Any]] = {}
    for c in names:
        secs = [x["seconds"] for x in runs[c]]
        if not secs:
            continue
        rows[c] = {
            "median_s": statistics.median(secs),
            "min_s": min(secs),
            "max_s": max(secs),
            "cpu_median_s": statistics.median(x["cpu_seconds"] for x in runs[c]),
            "seconds": secs,
            "peak_mb": warm[c]["peak_mb"],
            "process_peak_mb": warm[c].get("rss_total_mb"),
            "peak_mb_timed_runs_max": max(x["peak_mb"] for x in runs[c]),
            "mem_method": warm[c].get("mem_method"),
            "rss_baseline_mb": infos[c].get("rss_baseline_mb"),
            "version": infos[c].get("version", infos[c].get("torch")),
        }
    base = rows.get("plain")
    for row in rows.values():
        row["ratio"] = row["median_s"] / base["median_s"] if base else None
        row["best_ratio"] = row["min_s"] / base["min_s"] if base else None
        row["mem_ratio"] = (row["peak_mb"] / base["peak_mb"]) if base and base["peak_mb"] > 0 else None
        pp, bp = row.get("process_peak_mb"), base.get("process_peak_mb") if base else None
        row["process_mem_ratio"] = pp / bp if pp and bp else None

    cuda = args.device.startswith("cuda")
    unit = "CUDA MB" if cuda else "RSS MB"
    head = (f"\n  {'contender':<14} {'s/run':>8} {'s/epoch':>9} {'x plain':>8} {'min..max s/run':>16} {'best x':>7} "
            f"{'train peak ' + unit:>18} {'x plain':>8}")
    if not cuda:
        head += f" {'process peak MB':>16} {'x plain':>8}"
    print(head)
    for c, row in rows.items():
        line = (f"  {c:<14} {row['median_s']:>8.3f} {row['median_s'] / args.epochs:>9.4f} {_fmt(row['ratio'], '.2f'):>8} "
                f"{row['min_s']:>7.3f}..{row['max_s']:<7.3f} {_fmt(row['best_ratio'], '.2f'):>7} {row['peak_mb']:>18.1f} {_fmt(row['mem_ratio'], '.2f'):>8}")
        if not cuda:
            line += f" {_fmt(row.get('process_peak_mb'), '.0f'):>16} {_fmt(row.get('process_mem_ratio'), '.3f'):>8}"
        print(line)

    # Same work? The plain loop follows the engine's reproducibility protocol, so their per-epoch
    # numbers must agree; Keras/Lightning draw different initial weights, so only sanity-check them.
    notes = []
    if "plain" in warm and "engine" in warm and "history" in warm["engine"]:
        he, hp = warm["engine"]["history"], warm["plain"]["history"]
        diff = max(abs(a[k] - b[k]) for a, b in zip(he, hp, strict=True) for k in a)
        notes.append(f"parity engine vs plain: max |difference| over {len(he)} epochs of loss/accuracy/val_loss/val_accuracy = {diff:.1e}")
    for c in names:
        w = warm[c]
        last = w["history"][-1] if w.get("history") else w.get("final", {})
        if last:
            notes.append(f"{c}: final " + ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in last))
    if "engine" in infos and "engine_setup" in infos["engine"]:
        es = infos["engine"]["engine_setup"]
        tot = es["validate_s"] + es["data_load_s"]
        share = f" = {100 * tot / rows['engine']['median_s']:.1f}% of its run" if "engine" in rows else ""
        notes.append(f"engine in-call set-up (inside its timed region): validate_spec {1e3 * es['validate_s']:.2f} ms + "
                     f"data split/standardize/to-device {1e3 * es['data_load_s']:.2f} ms{share}")
    if "lightning" in rows:
        notes.append("lightning: TensorDataset DataLoaders (its idiomatic input; batches moved to the device by the Trainer), num_sanity_val_steps=0")
    if "keras" in rows:
        notes.append("keras: torch backend, fit(torch tensors, validation_data, validation_batch_size=360, metrics=['accuracy'], verbose=0)")
    if rows:
        m = next(iter(rows.values()))["mem_method"]
        notes.append(f"memory: train peak = {m}, for the first training in each contender's fresh process, after "
                     "a common torch warm-up (so torch's one-time lazy init, ~100 MB on CPU, counts for no one); "
                     + ("" if cuda else "process peak = that process's whole peak RSS (libraries + data + training)"))
    notes.append("s/run = median over rounds; best x = fastest run / plain's fastest run (less sensitive to other load "
                 "on the machine than the median; on a quiet machine the two agree)")
    for n in notes:
        print("  " + n)
    return {"workload": workload, "title": WORKLOADS[workload]["title"], "parameters": params, "rows": rows, "notes": notes}


def profile_engine(args: argparse.Namespace) -> None:
    """cProfile one engine run and one plain-loop run (each after a warm-up) and print the top of
    each: on a GPU, where a small model's step is launch-bound, the difference is the engine's cost."""
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(args.threads)
    for wl in args.workloads:
        for name in ("engine", "plain"):
            w = Worker(argparse.Namespace(**dict(vars(args), workload=wl, worker=name)))
            fn = w.run_engine if name == "engine" else w.run_plain
            fn()
            pr = cProfile.Profile()
            pr.enable()
            fn()
            if w.cuda:
                torch.cuda.synchronize()
            pr.disable()
            print(f"\n== cProfile of the {name}, {WORKLOADS[wl]['title']}, {args.epochs} epochs, {args.device} "
                  "(profiler overhead inflates Python costs)")
            pstats.Stats(pr).sort_stats("tottime").print_stats(22)


def ab_engine_plain(args: argparse.Namespace, workload: str, pairs: int) -> dict[str, Any]:
    """Engine vs plain loop alternating in ONE process (same allocator, same thread pool), at 1
    thread and at ``--threads``: wall and CPU-time medians. Subprocess rounds on a small shared VM
    swing by +-30 %; this A/B isolates the engine's own overhead."""
    import statistics as st

    out: dict[str, Any] = {}
    for threads in sorted({1, args.threads}):
        base = dict(vars(args), workload=workload, threads=threads)
        eng = Worker(argparse.Namespace(**dict(base, worker="engine")))
        pla = Worker(argparse.Namespace(**dict(base, worker="plain")))
        wall: dict[str, list[float]] = {"plain": [], "engine": []}
        cpu: dict[str, list[float]] = {"plain": [], "engine": []}
        for i in range(pairs):
            order = [("plain", pla.run_plain), ("engine", eng.run_engine)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t, c = time.perf_counter(), time.process_time()
                fn()
                if eng.cuda:
                    eng.torch.cuda.synchronize()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        r = {
            "wall_ratio_median": st.median(wall["engine"]) / st.median(wall["plain"]),
            "wall_ratio_min": min(wall["engine"]) / min(wall["plain"]),
            "cpu_ratio_median": st.median(cpu["engine"]) / st.median(cpu["plain"]),
            "plain_wall_median_s": st.median(wall["plain"]),
            "engine_wall_median_s": st.median(wall["engine"]),
        }
        out[f"threads_{threads}"] = r
        print(f"  in-process A/B, {threads} thread(s), {pairs} pairs: engine/plain wall median {r['wall_ratio_median']:.3f}, "
              f"wall min {r['wall_ratio_min']:.3f}, CPU time median {r['cpu_ratio_median']:.3f} "
              f"(plain {r['plain_wall_median_s']:.3f} s, engine {r['engine_wall_median_s']:.3f} s per run)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender once; default 5)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every contender (default 2)")
    p.add_argument("--only", default=",".join(c for c in CONTENDERS if c != "engine_nocheck"),
                   help=f"comma list of contenders, of {', '.join(CONTENDERS)} (default all but engine_nocheck)")
    p.add_argument("--workloads", default="small,large", help="comma list: small, large (default both)")
    p.add_argument("--json", metavar="PATH", help="write all results and raw timings here")
    p.add_argument("--profile", action="store_true", help="cProfile the engine and the plain loop in-process instead of benchmarking")
    p.add_argument("--logdir", default=None, help="worker stderr logs (default: a temp dir)")
    p.add_argument("--ab-pairs", type=int, default=15, help="engine/plain pairs of the in-process A/B (0: skip)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    if args.profile:
        profile_engine(args)
        return
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    for c in wanted:
        if c not in CONTENDERS:
            p.error(f"unknown contender {c!r}; known: {', '.join(CONTENDERS)}")
    contenders = []
    for c in CONTENDERS:
        if c not in wanted:
            continue
        if c in OPTIONAL and importlib.util.find_spec(OPTIONAL[c]) is None:
            print(f"note: {c} skipped: {OPTIONAL[c]!r} is not importable "
                  f"(optional: pip install -c constraints/cpu.txt keras lightning)")
            continue
        contenders.append(c)
    import tempfile

    logdir = Path(args.logdir) if args.logdir else Path(tempfile.mkdtemp(prefix="bench-engine-"))
    logdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; worker logs in {logdir}")
    results = [bench_workload(w, contenders, args, logdir) for w in args.workloads]
    if args.ab_pairs and "engine" in contenders and "plain" in contenders:
        for res in results:
            print(f"\n== {res['title']}: in-process A/B")
            res["ab"] = ab_engine_plain(args, res["workload"], args.ab_pairs if res["workload"] == "small" else max(3, args.ab_pairs // 3))
    load_end = os.getloadavg()[0]
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {load_end:.2f} at the end "
          f"(> ~0.5 beyond this benchmark's own means other work competed for the {os.cpu_count()} CPUs)")
    if args.json:
        out = {
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workload")},
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "results": results,
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
