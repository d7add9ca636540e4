"""GPU checks of the engine (run on a machine with CUDA; not part of CI).

python bench/gpu_smoke.py [--json out.json]

Checks: the source note's spec trains on cuda in fp32 and bf16 autocast (and with
torch.compile), a non-finite loss stops within one step on CUDA (the deferred check),
cancellation, resume-from-snapshot equality in deterministic mode on the GPU, and a fused pack's
hand-written gradients against autograd's on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training import BaseReporter, fit  # noqa: E402

# The source note's spec (examples/source-note.json), 12 epochs, on the GPU.
SPEC = {**json.loads((Path(__file__).resolve().parents[1] / "examples" / "source-note.json").read_text()),
        "name": "gpu-smoke", "device": "cuda", "epochs": 12}


class Snaps(BaseReporter):
    def __init__(self) -> None:
        self.snapshots = []

    def on_snapshot(self, snapshot) -> None:  # type: ignore[no-untyped-def]
        self.snapshots.append(snapshot)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    args = ap.parse_args()
    SPEC["device"] = args.device
    out: dict[str, object] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 1
        out["gpu"] = torch.cuda.get_device_name(0)
    ok = True
    variants = (("fp32", False), ("bf16", False), ("fp32", True)) if args.device != "cpu" else (("fp32", False), ("bf16", False))
    for precision, compile_ in variants:
        spec = copy.deepcopy(SPEC)
        spec["precision"], spec["compile"] = precision, compile_
        t = time.perf_counter()
        res = fit(spec)
        secs = time.perf_counter() - t
        acc = res.history[-1]["val_accuracy"]
        key = f"{precision}{'+compile' if compile_ else ''}"
        out[key] = {"val_accuracy": acc, "seconds": secs, "stop": res.stop_reason, "device": res.info["device"],
                    "epoch_seconds_median": sorted(h["seconds"] for h in res.history)[len(res.history) // 2]}
        print(key, out[key])
        ok &= acc > 0.9 and res.info["device"].startswith(args.device.split(":")[0])

    spec = copy.deepcopy(SPEC)
    spec["optimizer"] = {"name": "sgd", "learning_rate": 1e10}
    res = fit(spec)
    out["non_finite"] = {"stop": res.stop_reason, "steps": res.steps, "epochs": res.epochs_run}
    print("non-finite", out["non_finite"])
    ok &= res.stop_reason == "non_finite_loss" and res.steps <= 3

    spec = copy.deepcopy(SPEC)
    spec["epochs"] = 100000
    start = time.monotonic()
    res = fit(spec, should_stop=lambda: time.monotonic() - start > 1.0)
    out["cancel"] = {"stop": res.stop_reason, "seconds": time.monotonic() - start}
    print("cancel", out["cancel"])
    ok &= res.stop_reason == "cancelled" and out["cancel"]["seconds"] < 3  # type: ignore[index]

    spec = copy.deepcopy(SPEC)
    spec["deterministic"] = True
    rep = Snaps()
    full = fit(spec, reporter=rep)
    resumed = fit(spec, resume_from=rep.snapshots[4].data)
    wdiff = max((full.weights[k] - resumed.weights[k]).abs().max().item() for k in full.weights)
    hdiff = max(abs(a[k] - b[k]) for a, b in zip(full.history, resumed.history, strict=True) for k in a if k != "seconds")
    out["resume"] = {"max_weight_diff": wdiff, "max_history_diff": hdiff}
    print("resume", out["resume"])
    ok &= wdiff <= 1e-5 and hdiff <= 1e-5
    out["fused_hand_gradients"] = hand_gradients(args.device)
    print("fused hand-written gradients", out["fused_hand_gradients"])
    ok &= out["fused_hand_gradients"]["max_relative_diff"] <= 1e-6  # type: ignore[index]
    out["ok"] = bool(ok)
    print("OK" if ok else "FAILED")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


def hand_gradients(device: str) -> dict[str, object]:
    """A fused pack's hand-written gradients (``training.fused._Pack.backward``) against autograd's
    on ``device``: three digits-MLP trials (relu, dropout on, L2), one batch, the same dropout
    masks (same seed). On the CPU they are equal bit for bit (tests/training/test_fused.py)."""
    from bench.specs import digits_mlp
    from training import engine, fused
    from training.spec import validate_spec

    specs = []
    for k in range(3):
        spec = digits_mlp(f"gpu-hand-{k}", l2=1e-3 * (k + 1))
        spec.update(seed=k, device=device)
        specs.append(spec)
    members = [engine._Run(validate_spec(s), None, None) for s in specs]
    for m in members:
        m.start({})
    pack = fused._Pack(members, fused._fused_optimizer_for(members[0].optimizer))
    xb, tb = pack.x[:, :64], pack.t[:, :64]
    torch.manual_seed(3)
    _, _, by_hand = pack.train_pass(pack.params, xb, tb)
    got = by_hand()
    hand = pack.by_hand
    pack.by_hand = False
    torch.manual_seed(3)
    _, _, by_autograd = pack.train_pass(pack.params, xb, tb)
    want = by_autograd()
    rel = max(((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(got, want, strict=True))
    return {"by_hand": hand, "bitwise_equal": all(torch.equal(g, w) for g, w in zip(got, want, strict=True)),
            "max_relative_diff": rel if hand else float("inf")}


if __name__ == "__main__":
    raise SystemExit(main())
