"""GPU smoke check of the service (not collected by pytest; needs a CUDA machine):

    python -m tests.service.gpu_smoke [OUT_DIR]

Runs ``trainyard serve`` (SQLite + embedded broker), trains the source note's spec on ``cuda``
through it, checks metrics and the best checkpoint, cancels a running GPU job, then stops the
server with Ctrl-C. Prints a JSON summary (and writes it to OUT_DIR/gpu_smoke.json)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from safetensors.numpy import load as load_safetensors

from client import Client

from .helpers import ROOT, free_port, long_spec, note_spec, wait_status

DEVICE = os.environ.get("TRAINYARD_SMOKE_DEVICE", "cuda")  # "cpu" to try the script without a GPU


def main() -> int:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    summary: dict = {}
    port = free_port()
    data_dir = Path(tempfile.mkdtemp()) / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINYARD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        summary["serve_banner"] = proc.stdout.readline().strip()  # type: ignore[union-attr]
        with Client(f"http://127.0.0.1:{port}") as c:
            for precision in ("fp32", "bf16"):
                if precision == "bf16" and DEVICE == "cpu":
                    continue
                t0 = time.monotonic()
                job = c.submit(note_spec(20, device=DEVICE, precision=precision))
                done = wait_status(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=300)
                metrics = c.metrics(job["id"])
                data, digest = c.best_checkpoint(job["id"])
                shapes = sorted(t.shape for t in load_safetensors(data).values())
                started = datetime.fromisoformat(done["started_at"]) - datetime.fromisoformat(done["created_at"])
                summary[precision] = {
                    "status": done["status"], "stop_reason": done["stop_reason"], "error": done["error"],
                    "queue": done["queue"], "device": (done.get("info") or {}).get("device"),
                    "epochs": len(metrics), "best": done["best"], "last_val_accuracy": metrics[-1]["val_accuracy"],
                    "sha_ok": digest == hashlib.sha256(data).hexdigest(), "shapes": [list(s) for s in shapes],
                    "submit_to_running_s": started.total_seconds(), "wall_s": round(time.monotonic() - t0, 2),
                    "mean_epoch_s": sum(m["seconds"] for m in metrics) / len(metrics),
                }
                assert done["status"] == "succeeded", done
                assert str(summary[precision]["device"]).startswith(DEVICE), done["info"]
                assert summary[precision]["sha_ok"]
            long = c.submit(long_spec(device=DEVICE))
            cur = wait_status(c, long["id"], ("running",), timeout=120)
            while cur["progress"]["epoch"] < 3:
                time.sleep(0.1)
                cur = c.job(long["id"])
            t0 = time.monotonic()
            c.cancel(long["id"])
            cancelled = wait_status(c, long["id"], ("cancelled", "failed", "succeeded"), timeout=60)
            summary["cancel"] = {"status": cancelled["status"], "seconds": round(time.monotonic() - t0, 2),
                                 "epochs_run": cancelled["progress"]["epoch"]}
            assert cancelled["status"] == "cancelled"
        proc.send_signal(signal.SIGINT)
        summary["serve_exit"] = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        text = json.dumps(summary, indent=2, default=str)
        print(text)
        if out_dir:
            (out_dir / "gpu_smoke.json").write_text(text)
            log = data_dir / "logs" / "worker.log"
            if log.exists():
                (out_dir / "worker.log").write_text(log.read_text(errors="replace")[-200_000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
