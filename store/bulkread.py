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
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from typing import Any

from psycopg.adapt import Loader
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
            # picked from the row's jsonb copy (0007: a lookup, where json's -> parses the
            # epoch's text once per key), as that value's text: a row has a copy only when every
            # value of it reads from jsonb's text as from the stored one (no exponent jsonb would
            # write as a long integer, no negative zero: see the migration), so no value needs a
            # check here (a check per value and key cost 18-47 % of a cold request); a row
            # without one, from the stored text, as before
            value = (f'CASE WHEN m.values_b IS NULL THEN CAST(m."values" -> CAST(:{path} AS TEXT) AS TEXT) '
                     f"ELSE CAST(m.values_b -> CAST(:{path} AS TEXT) AS TEXT) END")
        else:
            params[path] = "$." + json.dumps(k)
            value = f'(m."values" -> :{path})'
        pairs.append(f"COALESCE(:{label} || {value}, '')")
    return f"'{{' || substr({' || '.join(pairs)}, 2) || '}}'", params


class Epochs:
    """One job's epochs as this process read them, oldest first, for one choice of keys (``proj``):
    their JSON texts comma-joined, UTF-8 (``inner``: the answer's array without its brackets, built
    by the database and extended as epochs are appended, so a whole curve is answered without
    joining its epochs again); their numbers and the texts' byte lengths, kept as the database sent
    them (comma-joined digits) and parsed only when a request needs them (a ``since_epoch`` or
    ``max_points`` pick), so that reading a job whole (a process's first request for a choice of
    keys) costs Python no work per epoch. ``rev``: the job's ``metrics_rewrites`` when they were
    read (0006): while the job's row still has it, no kept epoch was overwritten, deleted or filled
    in below the last one, so the list is still the job's curve up to ``k`` and only epochs after
    ``k`` are new. ``sealed``: read while the job's curve was compacted, so, while it still is (and
    ``rev`` holds), it cannot have changed (:mod:`store.curves`) and its rows are not read at all."""

    __slots__ = ("inner", "rev", "sealed", "chars", "k", "n", "_e", "_l", "_epochs", "_cum")

    def __init__(self, e: bytes, lens: bytes, inner: bytes, n: int, rev: int, sealed: bool,
                 epochs: list[int] | None = None, cum: list[int] | None = None) -> None:
        self.inner, self.rev, self.sealed, self.n = inner, rev, sealed, n
        self._e, self._l = e, lens  # b"1,2,3", b"120,121,121" (b"" when empty)
        self._epochs, self._cum = epochs, cum  # parsed, when a request needed them
        self.k = int(e[e.rfind(b",") + 1:]) if n else 0  # the last epoch
        # its size for the cache's bound: characters, and ~ the parsed lists' overhead (bytes) once parsed
        self.chars = len(inner) + len(e) + len(lens) + 72 * n

    @property
    def epochs(self) -> list[int]:
        if self._epochs is None:
            self._epochs = list(map(int, self._e.split(b","))) if self.n else []
        return self._epochs

    @property
    def cum(self) -> list[int]:
        """The texts' byte lengths summed: text i is ``inner[cum[i] + i:cum[i + 1] + i]`` (with the
        commas between them), and epoch i's tail starts at ``cum[i] + i``."""
        if self._cum is None:
            self._cum = list(accumulate(map(int, self._l.split(b",")), initial=0)) if self.n else [0]
        return self._cum

    def extended(self, n: int, epochs: bytes | None, texts: bytes | None, lens: bytes | None, rev: int,
                 sealed: bool) -> Epochs:
        """This list with the ``n`` epochs read after it (``epochs``, ``texts``, ``lens``
        comma-joined, as :func:`_pg_curves` reads them), as of revision ``rev``."""
        if not n:
            if self.sealed == sealed and self.rev == rev:
                return self
            return Epochs(self._e, self._l, self.inner, self.n, rev, sealed, self._epochs, self._cum)
        assert epochs is not None and texts is not None and lens is not None
        if not self.n:
            return Epochs(epochs, lens, texts, n, rev, sealed)
        # one copy of the kept text (a + between three strings made four); what was parsed stays parsed
        parsed_e = parsed_c = None
        if self._epochs is not None:
            parsed_e = self._epochs + list(map(int, epochs.split(b",")))
        if self._cum is not None:
            parsed_c = self._cum + list(accumulate(map(int, lens.split(b",")), initial=self._cum[-1]))[1:]
        return Epochs(b",".join([self._e, epochs]), b",".join([self._l, lens]), b",".join([self.inner, texts]),
                      self.n + n, rev, sealed, parsed_e, parsed_c)

    def render(self, since: int, max_points: int | None) -> tuple[int, tuple[bytes, ...]]:
        """(epochs after ``since``, the pieces of their JSON array: joined by the caller)."""
        if since >= self.k:
            return 0, (b"[]",)
        first = bisect_right(self.epochs, since) if since else 0
        total = self.n - first
        if max_points is not None and total > max_points:
            inner, cum = self.inner, self.cum
            picked = _kept(total, max_points)
            if first:
                picked = tuple(first + i for i in picked)
            return total, (b"[", b",".join([inner[cum[i] + i:cum[i + 1] + i] for i in picked]), b"]")
        if first == 0:
            return total, (b"[", self.inner, b"]")
        return total, (b"[", self.inner[self.cum[first] + first:], b"]")


EMPTY = Epochs(b"", b"", b"", 0, -1, False)


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


#: jobs a request reads whole (none of their epochs kept) from which its query is split in
#: :data:`PARTS` queries on as many pooled connections, run at once (PostgreSQL runs one query on
#: one core; a process's first request for a choice of keys reads 100,000 epochs: BENCHMARKS.md)
PARALLEL_FROM = 200
PARTS = 2
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2 * PARTS, thread_name_prefix="bulkread")
        return _POOL


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
      The database joins them into the answer's text, with their numbers and byte lengths
      (comma-joined digits, parsed only when ``since_epoch`` or ``max_points`` needs them), and
      the driver hands them over as bytes: no per-epoch work in Python to read a job whole.
      The kept epochs are checked by the job row's ``metrics_rewrites`` alone (0006): when it
      changed, the same subquery reads the job's epochs from its first, and the list is replaced.
      A sealed list of a job still compacted, at the same revision, reads no row at all.
      ``since_epoch`` and ``max_points`` are picked from the list here, so the database only
      parses an epoch's JSON (``keys``) once per process and epoch.

    With :data:`PARALLEL_FROM` or more jobs to read whole, the query is split in :data:`PARTS`
    (the jobs dealt out in turn), run at once on as many connections."""
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
    rows = ("job_metrics m WHERE m.job_id = w.id AND m.\"values\" IS NOT NULL "
            f"AND (c.job_id IS NULL OR w.f = 'n' OR (w.f = 's' AND NOT {same})) "
            f"AND m.epoch > CASE WHEN {same} THEN w.k ELSE 0 END ORDER BY m.epoch")
    sql = _sql(engine, (
        "SELECT CAST(w.id AS VARCHAR), c.job_id IS NOT NULL, c.n, CASE WHEN w.f = 'b' THEN c.body END, "
        "j.metrics_rewrites, x.n, x.e, x.t, x.l "
        # the ids, the kept lists' last epochs and revisions and the flags as comma-separated
        # strings: psycopg adapts a 1,000-item list to an array in Python (~3 ms each on the 2-core VM)
        "FROM unnest(string_to_array(:ids, ','), CAST(string_to_array(:ks, ',') AS int[]), "
        "CAST(string_to_array(:rs, ',') AS int[]), string_to_array(:flags, ',')) AS w(id, k, r, f) "
        "JOIN jobs j ON j.id = w.id AND j.project_id = :project "
        "LEFT JOIN job_curves c ON c.job_id = w.id "
        # the epochs after the kept ones (all of them if the job was rewritten since), in epoch
        # order as the index gives them (an ORDER BY in the aggregate sorted each job's rows);
        # none read when the compacted curve or a sealed list answers (a one-time filter).
        # Per job: how many, their numbers, their texts comma-joined (the answer's array without
        # its brackets) and the texts' byte lengths
        "CROSS JOIN LATERAL (SELECT count(*) AS n, string_agg(CAST(m.epoch AS TEXT), ',') AS e, "
        "string_agg(m.v, ',') AS t, string_agg(CAST(octet_length(m.v) AS TEXT), ',') AS l "
        f"FROM (SELECT m.epoch, {epoch_sql} AS v FROM {rows}) m) x"
    ))

    def params(ids: list[str]) -> dict[str, Any]:
        return {"ids": ",".join(ids), "ks": ",".join(str(kept[i].k if i in kept else 0) for i in ids),
                "rs": ",".join(str(kept[i].rev if i in kept else -1) for i in ids),
                "flags": ",".join(flags[i] for i in ids), "project": project_id, **key_params}

    ids = list(since)
    if sum(1 for i in ids if flags[i] == "n" and i not in kept) >= PARALLEL_FROM:
        parts = [ids[p::PARTS] for p in range(PARTS)]
        futures = [_pool().submit(_fetch_without_jit, engine, sql, params(part)) for part in parts[1:]]
        rows = _fetch_without_jit(engine, sql, params(parts[0]))
        for f in futures:
            rows += f.result()
    else:
        rows = _fetch_without_jit(engine, sql, params(ids))
    out: dict[str, tuple[int, tuple[bytes, ...]]] = {}
    fresh: dict[str, Epochs] = {}
    for job_id, compacted, n, body, rev, count, epochs, texts, lens in rows:
        flag = flags[job_id]
        if compacted and flag in "Bb":
            got = bodies[job_id] if body is None else body
            if body is not None and cache is not None:
                cache.put(job_id, got)
            out[job_id] = (int(n), (got,))
            continue
        have = kept.get(job_id, EMPTY)
        if not (compacted and flag == "s" and rev == have.rev):
            # rewritten since it was kept: what was read is the whole curve
            new = (have if rev == have.rev else EMPTY).extended(count, epochs, texts, lens, rev, sealed=compacted)
            if new is not have:
                have = fresh[job_id] = new
        out[job_id] = have.render(since[job_id], max_points)
    if cache is not None and fresh:
        cache.put_lists(proj, fresh)
    return out


class _Bytes(Loader):
    """``text`` columns as the bytes the server sent (UTF-8): the answer is bytes, so not decoded
    to ``str`` and encoded back (two copies of ~16 MB for 1,000 x 100 epochs)."""

    def load(self, data: Any) -> bytes:
        return bytes(data)


def _fetch_without_jit(engine: Engine, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of one SELECT, in autocommit, with PostgreSQL's JIT compilation off for it: the
    query's estimated cost (an index scan per job) is over ``jit_above_cost``, and compiling it
    took ~30 ms of a 40 ms answer, every time (EXPLAIN ANALYZE: "JIT ... Emission 24.7 ms").
    ``text`` columns come as bytes (:class:`_Bytes`; ``varchar`` ones as ``str``)."""
    conn = engine.raw_connection()
    try:
        conn.driver_connection.autocommit = True
        cur = conn.cursor()
        try:
            cur.adapters.register_loader("text", _Bytes)
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
