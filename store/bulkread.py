"""Bulk metrics: the curves of up to 1,000 jobs in one query, each epoch's stored JSON spliced
into the answer as text (never parsed and re-encoded), as :mod:`store.fastread` does for one job;
finished jobs' whole curves come precompacted, one row each (:mod:`store.curves`).

On PostgreSQL the API process also keeps each job's epochs it has read (:class:`CurveCache`,
per job and choice of ``keys``) and asks the database only for the epochs after them, with a
proof that those it keeps are unchanged (the job row's ``metrics_rewrites``, migration 0006:
one column per job, not one row per epoch); ``since_epoch`` and
``max_points`` are then picked from the kept list in Python (BENCHMARKS.md, dashboards)."""

from __future__ import annotations

import json
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, bindparam, text

from store.fastread import _kept, downsample


def _name(i: int) -> str:
    """A bind parameter name of letters only (store.fastread._sql rewrites ``:[a-z_]+``)."""
    out = ""
    while True:
        out = chr(97 + i % 26) + out
        i = i // 26 - 1
        if i < 0:
            return f"key_{out}"


def _epoch_expr(dialect: str, keys: Sequence[str] | None) -> tuple[str, dict[str, str]]:
    """The SQL text of an epoch's JSON: as stored, or only ``epoch`` and ``keys`` (built in SQL,
    so the Python side still never parses it)."""
    if not keys:
        return 'CAST(m."values" AS TEXT)', {}
    names = list(dict.fromkeys(["epoch", *keys]))
    # '{' + the ',"key":value' pairs the epoch has (a missing key's -> is NULL, and so is its
    # pair) + '}', as text. Each value is the stored text that -> returns: no object built and
    # re-parsed (PostgreSQL's json_build_object + json_strip_nulls took 2-3x longer at 100,000
    # epochs; SQLite's json_object wrote reals with 15 digits and missing keys as null).
    params: dict[str, str] = {}
    pairs = []
    for i, k in enumerate(names):
        label, path = _name(2 * i), _name(2 * i + 1)
        params[label] = "," + json.dumps(k) + ":"
        if dialect == "postgresql":
            params[path] = k
            value = f'CAST(m."values" -> CAST(:{path} AS TEXT) AS TEXT)'
        else:
            params[path] = "$." + json.dumps(k)
            value = f'(m."values" -> :{path})'
        pairs.append(f"COALESCE(:{label} || {value}, '')")
    return f"'{{' || substr({' || '.join(pairs)}, 2) || '}}'", params


class Epochs:
    """One job's epochs as this process read them, oldest first, for one choice of keys (``proj``):
    their numbers, and their JSON texts comma-joined, UTF-8 (``inner``: the answer's array without
    its brackets, built once and extended as epochs are appended, so a whole curve is answered without
    joining its epochs again) with where each text starts in it (``starts``, byte offsets, and one
    more item: where a next one would). ``rev``: the job's ``metrics_rewrites`` when they were read (0006):
    while the job's row still has it, no kept epoch was overwritten, deleted or filled in below
    the last one, so the list is still the job's curve up to ``k`` and only epochs after ``k`` are
    new. ``sealed``: read while the job's curve was compacted, so, while it still is (and ``rev``
    holds), it cannot have changed (:mod:`store.curves`) and its rows are not read at all."""

    __slots__ = ("epochs", "starts", "inner", "rev", "sealed", "chars")

    def __init__(self, epochs: list[int], starts: list[int], inner: bytes, rev: int, sealed: bool) -> None:
        self.epochs, self.starts, self.inner, self.rev, self.sealed = epochs, starts, inner, rev, sealed
        # its size for the cache's bound: characters, and ~ the ints' and lists' overhead (bytes)
        self.chars = len(inner) + 72 * len(epochs)

    @property
    def k(self) -> int:
        return self.epochs[-1] if self.epochs else 0

    def extended(self, epochs: str | None, texts: str | None, rev: int, sealed: bool) -> Epochs:
        """This list with the epochs read after it (``epochs`` comma-joined, ``texts`` joined by
        U+0001, which JSON text cannot contain unescaped), as of revision ``rev``."""
        if epochs is None:
            if self.sealed == sealed and self.rev == rev:
                return self
            return Epochs(self.epochs, self.starts, self.inner, rev, sealed)
        assert texts is not None
        more = texts.split("\x01")
        starts = self.starts[:-1]  # without the end mark
        at = self.starts[-1]  # where the next text goes (after the ",")
        ascii_only = texts.isascii()  # then a character is a byte
        for t in more:
            starts.append(at)
            at += (len(t) if ascii_only else len(t.encode())) + 1
        starts.append(at)  # the end mark: where a next text would go, as if the last were followed by ","
        new = ",".join(more).encode()
        # one copy of the kept text (a + between three strings made four)
        inner = b",".join([self.inner, new]) if self.epochs else new
        return Epochs(self.epochs + [int(e) for e in epochs.split(",")], starts, inner, rev, sealed)

    def render(self, since: int, max_points: int | None) -> tuple[int, tuple[bytes, ...]]:
        """(epochs after ``since``, the pieces of their JSON array: joined by the caller)."""
        first = bisect_right(self.epochs, since) if since else 0
        total = len(self.epochs) - first
        if max_points is not None and total > max_points:
            # epoch i's text is inner[starts[i]:starts[i + 1] - 1] (the end mark makes it so for the last)
            inner, starts = self.inner, self.starts
            picked = _kept(total, max_points)
            if first:
                picked = tuple(first + i for i in picked)
            return total, (b"[", b",".join([inner[starts[i]:starts[i + 1] - 1] for i in picked]), b"]")
        if first == 0:
            return total, (b"[", self.inner, b"]")
        return total, (b"[", self.inner[self.starts[first]:] if total else b"", b"]")


EMPTY = Epochs([], [0], b"", -1, False)


class CurveCache:
    """What this process keeps of the curves it has answered, each map up to ``max_chars``
    characters, least recently used out first:

    - finished jobs' compacted curves (:mod:`store.curves`), whole. A compacted row never
      changes: it is written once, at the job's terminal move, and may only be dropped (an epoch
      written after it; the job is terminal, so it is never compacted again). Each request still
      asks the database which of its jobs have one, so a dropped row is never answered from here;
      what the cache saves is the 16 MB of curve text per 1,000 x 100 epochs, read, decompressed
      and sent by the database on every request (BENCHMARKS.md, dashboards);
    - on PostgreSQL, any job's epochs as read (:class:`Epochs`), per job and choice of keys: each
      request reads only the epochs after them, and checks the rest by the job row's
      ``metrics_rewrites`` (unless sealed: read from a compacted curve's rows, and the job still
      has it at the same revision: then no row is read)."""

    def __init__(self, max_chars: int = 64_000_000) -> None:
        self.max_chars = max_chars
        self._curves: OrderedDict[str, bytes] = OrderedDict()
        self._chars = 0
        self._lists: OrderedDict[tuple[str, tuple[str, ...]], Epochs] = OrderedDict()
        self._list_chars = 0
        self._lock = threading.Lock()

    def snapshot(self, job_ids: Iterable[str]) -> dict[str, bytes]:
        with self._lock:
            out = {i: self._curves[i] for i in job_ids if i in self._curves}
            for i in out:
                self._curves.move_to_end(i)
            return out

    def put(self, job_id: str, body: bytes) -> None:
        if len(body) > self.max_chars:
            return
        with self._lock:
            if job_id in self._curves:
                return
            self._curves[job_id] = body
            self._chars += len(body)
            while self._chars > self.max_chars:
                _, old = self._curves.popitem(last=False)
                self._chars -= len(old)

    def lists(self, job_ids: Iterable[str], proj: tuple[str, ...]) -> dict[str, Epochs]:
        with self._lock:
            out = {}
            for i in job_ids:
                got = self._lists.get((i, proj))
                if got is not None:
                    self._lists.move_to_end((i, proj))
                    out[i] = got
            return out

    def put_lists(self, proj: tuple[str, ...], lists: dict[str, Epochs]) -> None:
        with self._lock:
            for job_id, new in lists.items():
                if new.chars > self.max_chars:
                    continue
                old = self._lists.pop((job_id, proj), None)
                if old is not None:
                    self._list_chars -= old.chars
                self._lists[(job_id, proj)] = new
                self._list_chars += new.chars
            while self._list_chars > self.max_chars:
                _, gone = self._lists.popitem(last=False)
                self._list_chars -= gone.chars

    def clear(self) -> None:
        with self._lock:
            self._curves.clear()
            self._chars = 0
            self._lists.clear()
            self._list_chars = 0


#: this process's cache (the API's bulk route reads through it)
CURVES = CurveCache()

#: what :func:`_portable_curves` answers per job of the project: (epochs after its since_epoch, the
#: curve's JSON text or None when ``cached`` has it, whether it is the compacted curve)
Found = dict[str, tuple[int, str | None, bool]]


def bulk_metrics_json(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None = None,
    max_points: int | None = None, cache: CurveCache | None = CURVES,
) -> bytes:
    """``POST /v1/metrics/bulk`` as JSON bytes: ``{"jobs": {id: {"epochs": [...], "total": n}},
    "missing": [ids not in the project]}``. Each job's epochs come after its own ``since_epoch``;
    a job without epochs yet is told from a missing one. Downsampling keeps the rows
    :func:`store.fastread.downsample` keeps (the single-job route's rule). What ``cache`` has
    (see :class:`CurveCache`) is not read again; ``None``: every curve is read."""
    if engine.dialect.name == "postgresql":
        found = _pg_curves(engine, project_id, since, keys, max_points, cache)
    else:
        found = _portable(engine, project_id, since, keys, max_points, cache)
    # one join of every piece (each curve's body as kept: not copied into a per-job string first),
    # the jobs in the order they were asked for
    # (as bytes: a str joined, then encoded, was one more copy of the ~16 MB)
    parts = [b'{"jobs":{']
    for job_id in since:
        got = found.get(job_id)
        if got is not None:
            parts += (f'"{job_id}":{{"epochs":'.encode(), *got[1], f',"total":{got[0]}}},'.encode())
    if found:
        parts[-1] = parts[-1][:-1]  # the last job's ","
    missing = [i for i in since if i not in found]
    parts.append(f'}},"missing":{json.dumps(missing)}}}'.encode())
    return b"".join(parts)


def _portable(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None, max_points: int | None,
    cache: CurveCache | None,
) -> dict[str, tuple[int, tuple[bytes, ...]]]:
    whole = not keys and max_points is None
    cached = cache.snapshot(i for i, s in since.items() if s == 0) if cache is not None and whole else {}
    out = {}
    for job_id, (total, curve, compacted) in _portable_curves(engine, project_id, since, keys, max_points,
                                                              cached).items():
        if curve is None:
            body = cached[job_id]
        else:
            body = curve.encode()
            if compacted and cache is not None:
                cache.put(job_id, body)
        out[job_id] = (total, (body,))
    return out


def _projection(keys: Sequence[str] | None) -> tuple[str, ...]:
    """The cache's name for a choice of keys: ``()`` for every key, else the keys an epoch's
    object is built of, in order (as :func:`_epoch_expr` builds it)."""
    return tuple(dict.fromkeys(["epoch", *keys])) if keys else ()


def _pg_curves(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None, max_points: int | None,
    cache: CurveCache | None,
) -> dict[str, tuple[int, tuple[bytes, ...]]]:
    """On PostgreSQL, one query, one row per job of the project:

    - a finished job's whole curve, asked from its first epoch with every key, is its compacted
      row (:mod:`store.curves`), or this process's copy of it when the row is still there;
    - any other is the job's epochs as this process keeps them (:class:`Epochs`, per choice of
      keys) and those the database has after them, read job by job (a LATERAL subquery over the
      primary key's index: no sort of all the rows, which spilled to disk at 100,000 epochs).
      The kept epochs are checked by the job row's ``metrics_rewrites`` alone (0006): when it
      changed, the same subquery reads the job's epochs from its first, and the list is replaced.
      A sealed list of a job still compacted, at the same revision, reads no row at all.
      ``since_epoch`` and ``max_points`` are picked from the list here, so the database only
      parses an epoch's JSON (``keys``) once per process and epoch."""
    from store.fastread import _sql

    proj = _projection(keys)
    epoch_sql, key_params = _epoch_expr("postgresql", keys)
    whole = not keys and max_points is None
    bodies = cache.snapshot(i for i, s in since.items() if s == 0) if cache is not None and whole else {}
    kept = cache.lists(since, proj) if cache is not None else {}
    # per job: 'B' / 'b' its compacted curve is wanted (and this process has it / has not), 's' a
    # sealed list is kept (enough while the job is compacted at that revision), 'n' neither
    flags = {i: ("B" if i in bodies else "b") if whole and s == 0 else "s" if i in kept and kept[i].sealed else "n"
             for i, s in since.items()}
    same = "j.metrics_rewrites = w.r"  # the kept epochs are still the job's (w.r is -1 when none is kept)
    sql = _sql(engine, (
        "SELECT w.id, c.job_id IS NOT NULL, c.n, CASE WHEN w.f = 'b' THEN c.body END, j.metrics_rewrites, x.e, x.t "
        # the ids, the kept lists' last epochs and revisions and the flags as comma-separated
        # strings: psycopg adapts a 1,000-item list to an array in Python (~3 ms each on the 2-core VM)
        "FROM unnest(string_to_array(:ids, ','), CAST(string_to_array(:ks, ',') AS int[]), "
        "CAST(string_to_array(:rs, ',') AS int[]), string_to_array(:flags, ',')) AS w(id, k, r, f) "
        "JOIN jobs j ON j.id = w.id AND j.project_id = :project "
        "LEFT JOIN job_curves c ON c.job_id = w.id "
        # the epochs after the kept ones (all of them if the job was rewritten since), in epoch
        # order as the index gives them (an ORDER BY in the aggregate sorted each job's rows);
        # none read when the compacted curve or a sealed list answers (a one-time filter)
        "CROSS JOIN LATERAL (SELECT string_agg(CAST(m.epoch AS TEXT), ',') AS e, "
        f"string_agg({epoch_sql}, chr(1)) AS t FROM (SELECT m.epoch, m.\"values\" FROM job_metrics m "
        "WHERE m.job_id = w.id AND m.\"values\" IS NOT NULL "
        f"AND (c.job_id IS NULL OR w.f = 'n' OR (w.f = 's' AND NOT {same})) "
        f"AND m.epoch > CASE WHEN {same} THEN w.k ELSE 0 END ORDER BY m.epoch) m) x"
    ))
    out: dict[str, tuple[int, tuple[bytes, ...]]] = {}
    fresh: dict[str, Epochs] = {}
    ids = list(since)
    params = {"ids": ",".join(ids), "ks": ",".join(str(kept[i].k if i in kept else 0) for i in ids),
              "rs": ",".join(str(kept[i].rev if i in kept else -1) for i in ids),
              "flags": ",".join(flags[i] for i in ids), "project": project_id, **key_params}
    for job_id, compacted, n, body, rev, epochs, texts in _fetch_without_jit(engine, sql, params):
        flag = flags[job_id]
        if compacted and flag in "Bb":
            got = bodies[job_id] if body is None else body.encode()
            if body is not None and cache is not None:
                cache.put(job_id, got)
            out[job_id] = (int(n), (got,))
            continue
        have = kept.get(job_id, EMPTY)
        if not (compacted and flag == "s" and rev == have.rev):
            # rewritten since it was kept: what was read is the whole curve
            new = (have if rev == have.rev else EMPTY).extended(epochs, texts, rev, sealed=compacted)
            if new is not have:
                have = fresh[job_id] = new
        out[job_id] = have.render(since[job_id], max_points)
    if cache is not None and fresh:
        cache.put_lists(proj, fresh)
    return out


def _fetch_without_jit(engine: Engine, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of one SELECT, in autocommit, with PostgreSQL's JIT compilation off for it: the
    query's estimated cost (an index scan per job) is over ``jit_above_cost``, and compiling it
    took ~30 ms of a 40 ms answer, every time (EXPLAIN ANALYZE: "JIT ... Emission 24.7 ms")."""
    conn = engine.raw_connection()
    try:
        conn.driver_connection.autocommit = True
        cur = conn.cursor()
        try:
            cur.execute("SET jit = off")
            try:
                cur.execute(sql, params)
                return cur.fetchall()
            finally:
                cur.execute("RESET jit")
        finally:
            cur.close()
    finally:
        conn.driver_connection.autocommit = False
        conn.close()  # back to the pool


def _portable_curves(
    engine: Engine, project_id: str, since: dict[str, int], keys: Sequence[str] | None, max_points: int | None,
    cached: dict[str, bytes],
) -> Found:
    """Elsewhere (SQLite, embedded mode): finished jobs' compacted curves when whole curves are
    asked for; the other jobs' epochs one row each, spliced together here."""
    epoch_sql, params = _epoch_expr(engine.dialect.name, keys)
    out: Found = {}
    rest = list(since)
    with engine.connect() as conn:
        if not keys and max_points is None:
            compacted = text(
                "SELECT j.id, c.n, CASE WHEN j.id IN :cached THEN NULL ELSE c.body END, c.job_id IS NOT NULL "
                "FROM jobs j LEFT JOIN job_curves c ON c.job_id = j.id WHERE j.id IN :ids AND j.project_id = :project"
            ).bindparams(bindparam("ids", expanding=True), bindparam("cached", expanding=True))
            found = conn.execute(compacted, {"ids": rest, "cached": list(cached), "project": project_id}).all()
            out = {job_id: (n, body, True) for job_id, n, body, has in found if has and since[job_id] == 0}
            rest = [row[0] for row in found if row[0] not in out]
        rows = []
        if rest:
            sql = text(
                f"SELECT j.id, m.epoch, {epoch_sql} FROM jobs j "
                "LEFT JOIN job_metrics m ON m.job_id = j.id AND m.epoch > :min_since "
                "WHERE j.id IN :ids AND j.project_id = :project ORDER BY j.id, m.epoch"
            ).bindparams(bindparam("ids", expanding=True))
            rows = conn.execute(sql, {"ids": rest, "project": project_id,
                                      "min_since": min(since[i] for i in rest), **params}).all()
    rows_by_job: dict[str, list[str]] = {}
    for job_id, epoch, body in rows:
        curve = rows_by_job.setdefault(job_id, [])
        if epoch is not None and epoch > since[job_id]:
            curve.append(body)
    for job_id, epochs in rows_by_job.items():
        total = len(epochs)
        if max_points is not None:
            epochs = downsample(epochs, max_points)
        out[job_id] = (total, f"[{','.join(epochs)}]", False)
    return out
