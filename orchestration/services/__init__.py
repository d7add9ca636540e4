"""Background loops, one per file, each a :class:`orchestration.services.base.LoopService`:
``start()``, ``run_once()``, ``interval`` (seconds) and ``stop()``.

* :mod:`.reconciler`: lost workers' jobs back to the queue (every process);
* :mod:`.outbox_relay`: outbox rows the broker has not accepted yet (every process);
* :mod:`.sweep_keeper`: sweeps whose last trial ended without a worker to advance them (workers).
"""
