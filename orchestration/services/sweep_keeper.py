"""The sweep keeper: sweeps whose last trial ended without a worker to advance them (workers)."""

from __future__ import annotations

from config.settings import Settings
from orchestration.services.base import LoopService
from orchestration.sweeps import advance_stalled
from store.outbox import Send


class SweepKeeper(LoopService):
    """Every ``interval`` (30 s), advance each running sweep that has no unfinished trial, so a
    sweep never hangs (:func:`orchestration.sweeps.advance_stalled`)."""

    name = "trainyard-sweep-keeper"
    interval = 30.0

    def __init__(self, settings: Settings, send: Send) -> None:
        super().__init__()
        self.settings, self.send = settings, send

    def run_once(self) -> list[str]:
        return advance_stalled(self.settings, self.send)
