"""The reconciler: lost workers' jobs back to the queue (every API and worker process runs one)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from orchestration.recovery import reconcile, reconcile_interval
from orchestration.services.base import LoopService
from store.outbox import Send


class Reconciler(LoopService):
    """Every :func:`orchestration.recovery.reconcile_interval` (at most 30 s), requeue or fail
    the ``running`` jobs of ``queues`` whose worker is lost: no heartbeat for the lease, or (with
    ``host``, in workers) a recorded worker process on this host that no longer exists. Then run
    ``also`` if given (the API re-sends messages a restarted Redis lost)."""

    name = "trainyard-reconciler"

    def __init__(self, send: Send, stale_after_s: float, queues: Sequence[str], *, host: str | None = None,
                 also: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.send, self.stale_after_s, self.queues, self.host, self.also = send, stale_after_s, queues, host, also
        self.interval = reconcile_interval(stale_after_s)

    def run_once(self) -> dict[str, Any]:
        requeued, failed = reconcile(self.stale_after_s, self.send, self.queues, self.host)
        out: dict[str, Any] = {"requeued": requeued, "failed": failed}
        if self.also is not None:
            out["also"] = self.also()
        return out
