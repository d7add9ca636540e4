"""Profile one packed run in-process (issue 13): N same-shape jobs of the digits MLP (bench/packing.py's
BASE) through the real worker path (``worker.runner.run_job`` -> ``worker.packs``), on SQLite in a temp dir.

    python bench/profile_pack.py --members 27 --epochs 3 [--profile out.prof]

Prints wall and process CPU seconds of the pack, per fused epoch, the commits and SQL statements of the
training thread (the pack's claim, writes and results; not the heartbeat threads), and (with --profile)
the top cumulative entries.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=27)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--warm", action="store_true", help="run a 2-job pack first (imports, data cache), as a warm worker has")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ty-profpack-"))
    os.environ.update(TRAINYARD_DATABASE_URL=f"sqlite:///{tmp}/db.sqlite", TRAINYARD_ARTIFACTS_URL=str(tmp / "art"),
                      TRAINYARD_DATA_DIR=str(tmp), TRAINYARD_PACK="1", TRAINYARD_AUTH="off")
    out = subprocess.run([sys.executable, "-m", "client.cli", "migrate"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from bench.packing import BASE
    from store import repo
    from store.db import session_scope
    from worker.runner import run_job

    specs = []
    for k in range(args.members):
        s = copy.deepcopy(BASE)
        s.update(name=f"p{k}", seed=1000 + k, epochs=args.epochs)
        s["optimizer"] = {"name": "adam", "learning_rate": 0.001 * (1 + k % 5)}
        specs.append(s)
    if args.warm:
        with session_scope() as s:
            warm = [j.id for j in repo.create_jobs(s, [(sp, "default", None) for sp in specs[:2]])]
        run_job(warm[0], send=lambda *a, **k: None)
    with session_scope() as s:
        ids = [j.id for j in repo.create_jobs(s, [(sp, "default", None) for sp in specs])]
    import torch  # noqa: F401 - imported before timing, as a warm worker has it
    from sqlalchemy import event

    from store.db import get_engine
    commits, statements = [0], [0]
    event.listen(get_engine(), "commit",
                 lambda conn: commits.__setitem__(0, commits[0] + (threading.current_thread() is threading.main_thread())))
    event.listen(get_engine(), "before_cursor_execute",
                 lambda *a: statements.__setitem__(0, statements[0] + (threading.current_thread() is threading.main_thread())))
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    status = run_job(ids[0], send=lambda *a, **k: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
    with session_scope() as s:
        jobs = [repo.get_job(s, i) for i in ids]
        statuses = [j.status for j in jobs]
        fused = sum(bool((j.info or {}).get("pack", {}).get("fused")) for j in jobs)
    print(f"status {status}; {statuses.count('succeeded')}/{len(ids)} succeeded, {fused} fused; "
          f"wall {wall:.2f} s, cpu {cpu:.2f} s; per epoch wall {wall / args.epochs:.2f} s cpu {cpu / args.epochs:.2f} s; "
          f"{commits[0]} commits and {statements[0]} statements by the training thread; load {os.getloadavg()[0]:.2f}")
    if prof is not None:
        import pstats
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
