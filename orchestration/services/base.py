"""The one shape of a background loop (after Prefect's ``LoopService``)."""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("trainyard.services")


class LoopService:
    """Runs :meth:`run_once` now and then every :attr:`interval` seconds in a daemon thread,
    until :meth:`stop`. An exception in one pass is logged and the loop goes on (a database or
    broker hiccup must not end it). Subclasses set ``name`` and ``interval`` and implement
    :meth:`run_once`, which tests call directly."""

    name = "trainyard-loop"
    interval = 1.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> Any:
        """One pass; returns what it did (for tests and logs)."""
        raise NotImplementedError

    def more(self, result: Any) -> bool:
        """Whether a pass that returned ``result`` left work behind, so the next starts at once
        (default: never; a loop that works in batches says when a batch was full)."""
        return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                again = self.more(self.run_once())
            except Exception as exc:  # noqa: BLE001 - keep going after a database or broker hiccup
                log.warning("%s: pass failed: %s: %s", self.name, type(exc).__name__, exc)
                again = False
            if not again:
                self._stop.wait(self.interval)

    def start(self) -> LoopService:
        """Start the thread (once; a second call does nothing). Returns self."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end after its current pass and wait up to ``timeout`` for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
