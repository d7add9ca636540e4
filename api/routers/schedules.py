"""/v1/schedules: preview a learning-rate schedule without training."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import multiprocessing.connection
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from api.errors import SpecProblem, error
from api.schemas.common import ErrorResponse
from api.schemas.misc import SchedulePreview, SchedulePreviewRequest
from training import SpecError
from training.schedules import preview_json
from training.spec import parse_learning_rate

router = APIRouter(prefix="/schedules", tags=["schedules"])

#: A preview is CPU work (up to 200,000 steps): it runs in a worker process (one per API process,
#: started on first use), so it neither blocks the event loop nor holds this process's GIL (a
#: thread would: every other request then waits for the GIL). One preview at a time; it stops
#: itself after PREVIEW_TIME_LIMIT_S (422), and a worker that overruns that is killed (503); a
#: request that waits PREVIEW_WAIT_S for its turn gets a 503.
PREVIEW_TIME_LIMIT_S = 5.0
PREVIEW_WAIT_S = 10.0
_PREVIEW_SLOTS: dict[int, anyio.CapacityLimiter] = {}
_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _preview_limiter() -> anyio.CapacityLimiter:
    """One limiter per event loop (a limiter belongs to the loop it is first used on)."""
    key = id(asyncio.get_running_loop())
    if key not in _PREVIEW_SLOTS:
        _PREVIEW_SLOTS.clear()
        _PREVIEW_SLOTS[key] = anyio.CapacityLimiter(1)
    return _PREVIEW_SLOTS[key]


def _pool() -> ProcessPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            # spawn: the API process has threads (a fork would copy their locks mid-use)
            _POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_exit_with_parent)
        return _POOL


def _exit_with_parent() -> None:
    """In the preview worker: end it when the API process that started it ends, however that
    ends. Nothing else would: a worker waits on its call queue, whose write end it holds itself,
    so an API process that was killed (or stopped without shutting the pool down) left it behind
    for good, ~45 MB each (four per test run were found still waiting)."""
    parent = multiprocessing.parent_process()
    if parent is None:  # pragma: no cover - a spawned worker always has one
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])  # ready once the parent is gone
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _kill_pool() -> None:
    """Stop the preview worker now (it overran, or died); the next preview starts a new one."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)


def _prefixed(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spec errors with their location under ``learning_rate`` (as in a job spec's optimizer)."""
    out = []
    for e in errors:
        loc = list(e.get("loc") or [])
        if not loc or loc[0] != "learning_rate":
            loc = ["learning_rate", *loc]
        out.append(error(loc, str(e.get("msg", "")), str(e.get("type", "value_error"))))
    return out


def _check_learning_rate(value: Any) -> Any:
    """The engine's own validation (training.spec.parse_learning_rate), plus what a preview
    cannot answer: a boolean is not a rate, and a rate must be finite (JSON has no NaN)."""
    if isinstance(value, bool):
        raise SpecProblem([error(["learning_rate"], "a learning rate must be a number or a schedule object, "
                                 "not a boolean", "float_type")])
    if isinstance(value, int | float) and not math.isfinite(value):
        raise SpecProblem([error(["learning_rate"], "a learning rate must be a finite number", "finite_number")])
    try:
        return parse_learning_rate(value)
    except SpecError as exc:
        raise SpecProblem(_prefixed(exc.errors)) from None


@router.post("/preview", response_model=SchedulePreview,
             responses={422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}, operation_id="preview_schedule")
async def preview(body: SchedulePreviewRequest) -> Response:
    """The learning rate of steps 0..steps-1 (warm-up included) for a number or a schedule."""
    _check_learning_rate(body.learning_rate)
    limiter = _preview_limiter()
    with anyio.move_on_after(PREVIEW_WAIT_S) as waiting:
        await limiter.acquire()
    if waiting.cancelled_caught:
        raise HTTPException(503, f"too many schedule previews in progress; this one waited {PREVIEW_WAIT_S:g} s "
                                 "for its turn", headers={"Retry-After": "5"})
    try:
        run = asyncio.get_running_loop().run_in_executor(
            _pool(), preview_json, body.learning_rate, body.steps, body.steps_per_epoch, PREVIEW_TIME_LIMIT_S)
        try:
            kind, value, field = await asyncio.wait_for(run, PREVIEW_TIME_LIMIT_S + PREVIEW_WAIT_S)
        except (TimeoutError, BrokenProcessPool):
            _kill_pool()
            raise HTTPException(503, "the schedule preview did not finish in time; retry with fewer steps",
                                headers={"Retry-After": "5"}) from None
    finally:
        limiter.release()
    if kind == "spec_error":
        raise SpecProblem(_prefixed(value))
    if kind == "schedule_error":
        raise SpecProblem([error(["learning_rate", *([field] if field else [])], value, "schedule_error")])
    return Response(value, media_type="application/json")
