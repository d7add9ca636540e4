"""Prediction latency: ``POST /v1/jobs/{id}/predict`` with a batch of 32 raw digits.

Starts ``trainyard serve`` (API + worker, SQLite, embedded broker) in a temporary data directory,
trains the source note's model for a few epochs, lets the first request produce the ONNX export,
then times sequential requests from one keep-alive client. Baselines measured in the same run:

* ``GET /v1/jobs/{id}``: the same server, client, database and auth path, no model (the HTTP floor);
* ``onnxruntime`` in this process: the same exported model on the same batch (the compute floor);
* ``torch``: ``training.load_model(best).predict`` on the same batch, in this process.

Targets (issue 16): predict p50 <= 20 ms, p99 <= 100 ms on this CPU.

    .venv/bin/python bench/predict.py                 # 500 requests (~1 min with training)
    .venv/bin/python bench/predict.py --requests 2000 --json bench/out/predict.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def timed(fn: Any, n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import onnxruntime as ort

    from training import data as data_mod
    from training import load_model
    from training.spec import validate_spec

    spec = json.loads((ROOT / "examples" / "source-note.json").read_text())
    spec.update(epochs=args.epochs, device="cpu")
    job = validate_spec(spec)
    x = data_mod.load(job.data.model_copy(update={"standardize": False}), job.seed).x_val[: args.batch]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-predict-") as tmp:
        log = open(Path(tmp) / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--port", str(port), "--data-dir", tmp],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                start_new_session=True)
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if http.get("/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit(f"the service did not start: see {tmp}/serve.log")
                    time.sleep(0.3)
                job_id = http.post("/v1/jobs", json=spec).json()["id"]
                while (status := http.get(f"/v1/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed", "cancelled"):
                    time.sleep(0.3)
                assert status == "succeeded", status
                body = {"inputs": x.tolist()}
                t = time.perf_counter()
                while (r := http.post(f"/v1/jobs/{job_id}/predict", json=body, params={"wait": 30})).status_code == 202:
                    pass
                r.raise_for_status()
                first_ms = (time.perf_counter() - t) * 1000
                onnx_bytes = http.get(f"/v1/jobs/{job_id}/export", params={"format": "onnx"}).content
                best = http.get(f"/v1/jobs/{job_id}/checkpoints/best").content

                results: dict[str, list[float]] = {}
                results["predict"] = timed(lambda: http.post(f"/v1/jobs/{job_id}/predict", json=body).raise_for_status(), args.requests)
                results["get_job"] = timed(lambda: http.get(f"/v1/jobs/{job_id}").raise_for_status(), args.requests)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    results["onnxruntime"] = timed(lambda: session.run(None, {"input": x}), args.requests)
    model = load_model(best)
    results["torch"] = timed(lambda: model.predict(x), args.requests)

    base = pct(results["get_job"], 50)
    print(f"batch {args.batch} digits, {args.requests} sequential requests; first request (export + session) {first_ms:.0f} ms")
    print(f"{'what':<34}{'p50 ms':>9}{'p99 ms':>9}{'p50 / GET job':>15}")
    names = {"predict": "POST /predict (API, onnxruntime)", "get_job": "GET /jobs/{id} (baseline)",
             "onnxruntime": "onnxruntime in-process", "torch": "load_model().predict (torch)"}
    out: dict[str, Any] = {"batch": args.batch, "requests": args.requests, "first_request_ms": first_ms}
    for k, v in results.items():
        p50, p99 = pct(v, 50), pct(v, 99)
        out[k] = {"p50_ms": p50, "p99_ms": p99, "ratio_p50_to_get_job": p50 / base}
        print(f"{names[k]:<34}{p50:>9.2f}{p99:>9.2f}{p50 / base:>15.2f}")
    ok = out["predict"]["p50_ms"] <= 20 and out["predict"]["p99_ms"] <= 100
    print(f"target p50 <= 20 ms, p99 <= 100 ms: {'met' if ok else 'NOT met'}; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
