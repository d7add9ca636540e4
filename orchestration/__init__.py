"""The decision layer, between the entry points (``api/``, ``worker/``) and the store: what may
happen to a job and when. Rows and queries stay in ``store/``; the engine in ``training/``.

* :mod:`orchestration.admission`: spec admission (validation, limits, stored datasets) for
  jobs, batches and sweep trials alike;
* :mod:`orchestration.recovery`: lost and stalled attempts (requeue, or fail after max_attempts);
* :mod:`orchestration.messages`: the one way to send "run these job ids" to the broker;
* :mod:`orchestration.sweeps`: advancing sweeps as their trials end;
* :mod:`orchestration.services`: the background loops, one per file, one shape.

The job lifecycle's table of allowed transitions lives in :mod:`store.lifecycle`, beside the
compare-and-set that enforces it (store/ must not import this layer).
"""
