"""Prometheus metrics computed from the database (the truth) at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from store import repo
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
        h = HistogramMetricFamily(
            "trainyard_job_run_seconds", "Wall time of finished jobs, from start to terminal state"
        )
        h.add_metric(
            [], [(str(float(b)), c) for b, c in zip(DURATION_BUCKETS, buckets, strict=True)] + [("+Inf", count)], total
        )
        yield h


def make_registry(dispatcher: Any) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobsCollector(dispatcher))
    return reg
