"""What the CLI prints: tables that fit the terminal (80 columns included) without cutting
what matters, a job's outcome in one line, the learning-rate finder's curve as text.

Rules for every table: an id is printed whole on one line (it is typed back; any unique prefix
of it is accepted too); other columns wrap (never end in "…") and are kept short instead.
"""

from __future__ import annotations

import json
import math
from typing import Any

from rich import box
from rich.table import Column, Table


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def table(*columns: str | Column, ids: tuple[str, ...] = ("id",), title: str | None = None,
          caption: str | None = None) -> Table:
    """A compact table: the columns named in ``ids`` never wrap, the others fold."""
    cols = [
        c if isinstance(c, Column) else Column(c, no_wrap=c in ids, overflow="fold", min_width=len(c) if c in ids else None)
        for c in columns
    ]
    return Table(*cols, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title=title, caption=caption,
                 title_justify="left", caption_justify="left")


def when(iso: str | None) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM' (UTC, as stored)."""
    return iso[:16].replace("T", " ") if iso else "-"


def status_text(row: dict[str, Any]) -> str:
    """A job's status, with the stop reason when it says more ('succeeded' and 'completed' are
    the default pair): 'succeeded (early_stopping)', 'succeeded (pruned)', 'failed (error)'."""
    reason = row.get("stop_reason")
    return row["status"] + (f" ({reason})" if reason and reason != "completed" else "")


def short_status(row: dict[str, Any]) -> str:
    """For narrow columns: a succeeded job's stop reason when it is not 'completed' (a
    succeeded job that stopped early or was pruned says 'early_stopping' or 'pruned'), else
    the status."""
    reason = row.get("stop_reason")
    # spaces, not underscores: a narrow column wraps 'early stopping' between the words
    return reason.replace("_", " ") if row["status"] == "succeeded" and reason and reason != "completed" else row["status"]


def is_lr_find(job: dict[str, Any]) -> bool:
    return (job.get("spec") or {}).get("kind") == "lr_find"


def best_text(best: dict[str, Any] | None, digits: int = 4) -> str:
    if not best or not best.get("monitor"):
        return "-"
    return f"{best['monitor']}={fmt(best.get('value'), digits)}"


def outcome(job: dict[str, Any]) -> str:
    """One line: how the job ended (or where it is), with its best value or suggested rate."""
    head = f"{job['id']} {status_text(job)}"
    if job.get("error"):
        return f"{head}: {job['error']}"
    found = (job.get("info") or {}).get("lr_find")
    if is_lr_find(job):
        if not found:
            return head
        return f"{head}: suggested learning rate {fmt(found.get('suggested_learning_rate'), 3)} ({found.get('rule')})"
    best = job.get("best") or {}
    line = f"{head}, {job['progress']['epoch']}/{job['progress']['epochs']} epochs"
    if best.get("monitor"):
        line += f", best {best['monitor']} {fmt(best.get('value'), 6)} at epoch {best.get('epoch')}"
    return line


def lr_curve(found: dict[str, Any], width: int = 60, height: int = 12) -> str:
    """The finder's smoothed loss against the learning rate (log scale) as a text plot, with the
    suggested rate marked '|'. The loss axis spans the curve's minimum to its first value (the
    blow-up at the end is clipped to the top row)."""
    pts = [(lr, loss) for lr, loss in zip(found.get("lrs") or [], found.get("losses") or [], strict=False)
           if loss is not None and math.isfinite(loss) and lr > 0]
    if len(pts) < 2:
        return "(no curve: fewer than 2 finite points)"
    x0, x1 = math.log10(pts[0][0]), math.log10(pts[-1][0])
    lo = min(v for _, v in pts)
    hi = max(pts[0][1], lo + 1e-12)
    grid = [[" "] * width for _ in range(height)]

    def col(lr: float) -> int:
        return min(width - 1, max(0, round((math.log10(lr) - x0) / ((x1 - x0) or 1) * (width - 1))))

    suggested = found.get("suggested_learning_rate")
    if suggested:
        c = col(suggested)
        for r in range(height):
            grid[r][c] = "|"
    for lr, v in pts:
        r = height - 1 - min(height - 1, round((min(v, hi) - lo) / (hi - lo) * (height - 1)))
        grid[r][col(lr)] = "*"
    labels = [fmt(hi, 3), fmt(lo, 3)]
    pad = max(len(s) for s in labels)
    lines = []
    for r, row in enumerate(grid):
        label = labels[0] if r == 0 else labels[1] if r == height - 1 else ""
        lines.append(f"{label:>{pad}} ┤{''.join(row).rstrip()}")
    left, right = fmt(pts[0][0], 2), fmt(pts[-1][0], 2)
    lines.append(" " * pad + " └" + "─" * width)
    lines.append(" " * (pad + 2) + left + right.rjust(width - len(left)))
    lines.append(" " * (pad + 2) + "learning rate (log scale); * smoothed loss; | suggested")
    return "\n".join(lines)


def job_lines(job: dict[str, Any]) -> list[str]:
    """``trainyard show``: the job's fields, one per line; an lr_find job's suggestion and curve."""
    best = job.get("best") or {}
    lines = [
        f"id          {job['id']}", f"name        {job['name']}",
        f"status      {status_text(job)}",
        f"queue       {job['queue']}",
    ]
    found = (job.get("info") or {}).get("lr_find")
    if is_lr_find(job):
        lines.append("kind        lr_find (learning-rate range test)")
        if found:
            lines += [
                f"suggested   learning_rate = {fmt(found.get('suggested_learning_rate'), 6)}",
                f"rule        {found.get('rule')}",
                f"range       {fmt(found.get('min_lr'), 3)} to {fmt(found.get('max_lr'), 3)} over "
                f"{len(found.get('lrs') or [])} steps" + (" (stopped early: the loss blew up)" if found.get("stopped_early") else ""),
            ]
    else:
        lines += [
            f"progress    {job['progress']['epoch']}/{job['progress']['epochs']} epochs",
            f"best        {best.get('monitor')} = {fmt(best.get('value'), 6)} at epoch {best.get('epoch')}"
            if best.get("monitor") else "best        -",
        ]
        if found:
            lines.append(f"found lr    {fmt(found.get('suggested_learning_rate'), 6)} ({found.get('rule')})")
    lines += [
        f"attempts    {job['attempts']}", f"created     {job['created_at']}",
        f"started     {job.get('started_at') or '-'}", f"finished    {job.get('finished_at') or '-'}",
    ]
    if job.get("error"):
        lines.append(f"error       {job['error']}")
    if is_lr_find(job) and found:
        lines += ["", lr_curve(found)]
    return lines


def param_headers(names: list[str]) -> list[str]:
    """Sweep parameter paths as column headers: the last segment when that is unambiguous
    ('optimizer.learning_rate' -> 'learning_rate'), else the whole path."""
    last = [n.replace("]", "").split(".")[-1].split("[")[-1] for n in names]
    return [short if last.count(short) == 1 else name for name, short in zip(names, last, strict=True)]


def leaderboard(sweep: dict[str, Any], top: int = 15) -> Table:
    """A sweep's leaderboard (best first), then its queued and running trials."""
    counts = sweep["counts"]
    obj = sweep["objective"]
    title = (
        f"sweep {sweep['name']} {sweep['id']}: {sweep['status']}"
        + (f" - {sweep['error']}" if sweep.get("error") else "")
        + f"\n{counts['total']}/{sweep['max_trials']} trials: {counts['running']} running, {counts['queued']} queued, "
        f"{counts['succeeded']} done ({counts['pruned']} pruned), {counts['failed']} failed, {counts['cancelled']} cancelled"
    )
    names = list(sweep["config"].get("parameters", {}))
    headers = param_headers(names)
    caption = None
    if headers != names:
        caption = "parameters: " + ", ".join(f"{h} = {n}" for h, n in zip(headers, names, strict=True) if h != n)
    title += f"\nobjective: {obj['metric']} ({obj['mode']})"
    t = table("#", "trial", "value", "epochs", "status", *headers, ids=("#", "trial", "epochs"), title=title,
              caption=caption)
    shown = sweep["leaderboard"][:top]
    shown_ids = {r["job_id"] for r in shown}
    live = [r for r in sweep["trials"] if r["status"] in ("running", "queued") and r["job_id"] not in shown_ids]
    for rank, r in enumerate(shown + live, 1):
        t.add_row(
            str(rank) if r in shown else "", str(r["number"]), fmt(r.get("value")), f"{r['epochs_run']}/{r['epochs']}",
            short_status(r), *(fmt(r["params"].get(n)) for n in names),
        )
    return t


def sweep_lines(sweep: dict[str, Any]) -> list[str]:
    """``trainyard sweep show``: the sweep's fields and its best trial (job id in full)."""
    best = sweep.get("best_trial")
    lines = [
        f"id          {sweep['id']}", f"name        {sweep['name']}",
        f"status      {sweep['status']}" + (f": {sweep['error']}" if sweep.get("error") else ""),
        f"method      {sweep['method']}",
        f"objective   {sweep['objective']['metric']} ({sweep['objective']['mode']})",
        f"trials      {sweep['counts']['total']}/{sweep['max_trials']}",
    ]
    if best:
        lines += [f"best        trial {best['number']}: {sweep['objective']['metric']} = {fmt(best['value'], 6)}",
                  f"best job    {best['job_id']}", "best params"]
        lines += [f"  {k} = {json.dumps(v)}" for k, v in best["params"].items()]
    return lines


#: the order of statuses in counts
STATUS_ORDER = ("queued", "running", "paused", "succeeded", "failed", "cancelled")


def counts_line(jobs: Any) -> str:
    """'3 queued, 2 running, 10 succeeded, 1 failed': the jobs' counts by status (none left out
    but the zeros)."""
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j["status"]] = counts.get(j["status"], 0) + 1
    return ", ".join(f"{counts[s]} {s}" for s in STATUS_ORDER if counts.get(s))


def running_line(running: list[dict[str, Any]], most: int) -> str:
    """A few running jobs on one line each: id prefix, name, epoch/epochs, best value."""
    lines = [f"  {j['id'][:8]} {j['name'][:24]:24} {j['progress']['epoch']}/{j['progress']['epochs']} "
             f"{best_text(j.get('best'))}" for j in running[:most]]
    if len(running) > most:
        lines.append(f"  ... and {len(running) - most} more running")
    return "\n".join(lines)


def summary_table(jobs: list[dict[str, Any]], *, failures: int = 20) -> Any:
    """After ``submit --wait``: the counts, the jobs by best value (a row each, smallest first,
    jobs without one last) and the failures with their errors (``failures`` at most)."""
    from rich.console import Group
    from rich.text import Text

    ranked = sorted(jobs, key=lambda j: _best_key(j.get("best")))
    t = table("id", "status", "stop reason", "best", "name", caption=counts_line(jobs))
    for j in ranked:
        t.add_row(j["id"], j["status"], (j.get("stop_reason") or "-").replace("_", " "),
                  best_text(j.get("best")), j["name"])
    failed = [j for j in jobs if j["status"] == "failed"]
    parts: list[Any] = [t]
    if failed:
        parts.append(Text(f"\n{len(failed)} failed:"))
        parts += [Text(f"  {j['id']}: {j.get('error') or j.get('stop_reason')}") for j in failed[:failures]]
        if len(failed) > failures:
            parts.append(Text(f"  ... and {len(failed) - failures} more (trainyard jobs --status failed)"))
    return Group(*parts)


def _best_key(best: dict[str, Any] | None) -> tuple[int, float]:
    try:
        value = float(best["value"]) if best and best.get("value") is not None else math.inf
    except (TypeError, ValueError):
        value = math.inf
    return (0 if math.isfinite(value) else 1, value if math.isfinite(value) else 0.0)


def metric_columns(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The columns of a metrics table: epoch first, then every metric any epoch has, in the
    order first seen."""
    seen: dict[str, None] = {"epoch": None}
    for epochs in curves.values():
        for e in epochs:
            seen.update(dict.fromkeys(e))
    return list(seen)
