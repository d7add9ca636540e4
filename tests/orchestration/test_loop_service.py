"""The one shape of the background loops (orchestration.services.base.LoopService)."""

from __future__ import annotations

import threading

from orchestration.services.base import LoopService
from orchestration.services.outbox_relay import OutboxRelay
from orchestration.services.reconciler import Reconciler
from orchestration.services.sweep_keeper import SweepKeeper


class Counting(LoopService):
    name = "test-loop"
    interval = 0.01

    def __init__(self, fail_first: int = 0) -> None:
        super().__init__()
        self.calls = 0
        self.fail_first = fail_first
        self.enough = threading.Event()

    def run_once(self) -> int:
        self.calls += 1
        if self.calls >= 5:
            self.enough.set()
        if self.calls <= self.fail_first:
            raise RuntimeError("a database hiccup")
        return self.calls


def test_a_loop_runs_at_once_then_every_interval_until_stopped_and_survives_a_failing_pass():
    loop = Counting(fail_first=2).start()
    assert loop.start() is loop  # a second start does nothing
    assert loop.enough.wait(5)
    loop.stop()
    calls = loop.calls
    assert calls >= 5 and loop._thread is None
    assert not loop.enough.wait(0.05) or loop.calls == calls  # nothing runs after stop


def test_every_service_has_the_same_shape():
    send = lambda jobs: None  # noqa: E731
    services = [Reconciler(send, 60.0, ["q"]), OutboxRelay(send, ["q"], interval=1.0), SweepKeeper(None, send)]  # type: ignore[arg-type]
    for service in services:
        assert isinstance(service, LoopService)
        assert callable(service.run_once) and callable(service.start) and callable(service.stop)
        assert service.interval > 0 and service.name.startswith("trainyard-")
    assert services[0].interval == 15.0  # the reconciler: a quarter of the lease
