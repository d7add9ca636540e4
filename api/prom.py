"""Prometheus metrics computed from the database (the truth) at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from store import pollread, repo, scheduling
from store.db import session_scope
from store.models import JOB_STATUSES

DURATION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)


class JobsCollector(Collector):
    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Any]:
        with session_scope(write=False) as s:
            counts = repo.counts_by_status(s)
            buckets, count, total = repo.duration_buckets(s, DURATION_BUCKETS)
            queued = scheduling.queued_by_project(s)
        g = GaugeMetricFamily("trainyard_jobs", "Jobs by state", labels=["status"])
        for st in JOB_STATUSES:
            g.add_metric([st], counts.get(st, 0))
        yield g
        q = GaugeMetricFamily("trainyard_queue_depth", "Messages waiting in the broker per queue", labels=["queue"])
        try:
            for name, depth in self.dispatcher.queue_depths().items():
                q.add_metric([name], depth)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the broker is down
            pass
        yield q
        p = GaugeMetricFamily("trainyard_queued_jobs", "Queued jobs per project and queue (the database's count)",
                              labels=["project", "queue"])
        for project, queue, n in queued:
            p.add_metric([project, queue], n)
        yield p
        h = HistogramMetricFamily(
            "trainyard_job_run_seconds", "Wall time of finished jobs, from start to terminal state"
        )
        h.add_metric(
            [], [(str(float(b)), c) for b, c in zip(DURATION_BUCKETS, buckets, strict=True)] + [("+Inf", count)], total
        )
        yield h


class PollsCollector(Collector):
    """This API process's polls of ``GET /v1/jobs/{id}`` and ``/metrics``: how many the fast path
    answered (api.fastpath) and how many queries the poll threads ran (store.pollread; identical
    concurrent polls share one, so under load there are fewer queries than polls)."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily("trainyard_polls_fast", "Polls answered by the fast path", value=self.stats.served)
        yield CounterMetricFamily("trainyard_poll_queries", "Queries run by the poll threads",
                                  value=pollread.total_queries())


def make_registry(dispatcher: Any, poll_stats: Any = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobsCollector(dispatcher))
    if poll_stats is not None:
        reg.register(PollsCollector(poll_stats))
    return reg
