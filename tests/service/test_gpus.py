"""``trainyard worker --gpus``: one Celery worker process per GPU, each pinned with
CUDA_VISIBLE_DEVICES, under a supervisor that restarts a dead child. On a CPU machine the device
list is faked (TRAINYARD_TEST_FAKE_GPUS, honoured only with TRAINYARD_TEST_FAULTS=1); what each
child saw is what it logged itself (worker.app.log_devices). bench/gpus_check.sh runs the same on
a machine with GPUs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .conftest import RUN_ID, cli
from .helpers import ROOT, stop

STARTED = re.compile(r"started (gpu\d+) \(pid (\d+), CUDA_VISIBLE_DEVICES=(\d+)\)")
SAW = re.compile(r"trainyard worker pid (\d+): CUDA_VISIBLE_DEVICES=(\S+); torch sees (\d+) CUDA")


def _wait(path: Path, predicate, proc: subprocess.Popen, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = predicate(text)
        if found:
            return found
        assert proc.poll() is None, f"the supervisor exited with {proc.returncode}:\n{text[-3000:]}"
        time.sleep(0.3)
    raise TimeoutError(f"not seen within {timeout} s in {path}:\n{path.read_text(errors='replace')[-3000:]}")


def _gpu_env(service_env: dict[str, str], fake: str) -> dict[str, str]:
    return {**service_env, "TRAINYARD_TEST_FAULTS": "1", "TRAINYARD_TEST_FAKE_GPUS": fake,
            # its own queues: these workers must not take the session's jobs
            "TRAINYARD_QUEUE_PREFIX": f"ty-{RUN_ID}-gpus-"}


def test_one_pinned_worker_per_gpu_and_a_dead_one_is_restarted(service_env, migrated, tmp_path):
    log = tmp_path / "supervisor.log"
    with log.open("wb") as f:
        sup = subprocess.Popen(cli("worker", "--queues", "cpu", "--gpus", "0,1", "--name", f"ty-{RUN_ID}-g"),
                               env=_gpu_env(service_env, "2"), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        def both_ready(text: str):  # type: ignore[no-untyped-def]
            started = {m[0]: (int(m[1]), m[2]) for m in STARTED.findall(text)}
            saw = {int(m[0]): m[1] for m in SAW.findall(text)}
            if len(started) == 2 and all(pid in saw for pid, _ in started.values()):
                return started, saw
            return None

        started, saw = _wait(log, both_ready, sup)
        assert set(started) == {"gpu0", "gpu1"}
        for name, (pid, device) in started.items():
            assert device == name[3:]
            assert saw[pid] == device, f"{name} (pid {pid}) saw CUDA_VISIBLE_DEVICES={saw[pid]}"
        pid0, pid1 = started["gpu0"][0], started["gpu1"][0]
        assert pid0 != pid1

        os.kill(pid1, signal.SIGKILL)

        def restarted(text: str):  # type: ignore[no-untyped-def]
            if f"gpu1 (pid {pid1}) exited with status -9; restarting" not in text:
                return None
            again = [int(p) for n, p, _ in STARTED.findall(text) if n == "gpu1" and int(p) != pid1]
            saw = {int(m[0]): m[1] for m in SAW.findall(text)}
            return again[0] if again and again[0] in saw else None

        new_pid = _wait(log, restarted, sup)
        text = log.read_text()
        assert {int(m[0]): m[1] for m in SAW.findall(text)}[new_pid] == "1"
        os.kill(pid0, 0)  # the other GPU's worker kept running (raises if it is gone)
        assert f"gpu0 (pid {pid0}) exited" not in text
    finally:
        stop(sup, timeout=60)
    assert sup.returncode == 0
    for pid in (pid0, new_pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"child {pid} outlived its supervisor")


def test_fake_device_list_is_still_validated(service_env):
    out = subprocess.run(cli("worker", "--queues", "cpu", "--gpus", "0,2"), env=_gpu_env(service_env, "2"),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no GPU 2 here: this machine has 2 (0-1)" in out.stderr
