"""The decision layer, between the entry points (``api/``, ``worker/``) and the store: what may
happen to a job and when. Rows and queries stay in ``store/``; the engine in ``training/``.

* :mod:`orchestration.lifecycle`: the job's allowed status transitions, one table that every
  status change goes through;
* :mod:`orchestration.recovery`: lost and stalled attempts (requeue, or fail after max_attempts);
* :mod:`orchestration.messages`: the one way to send "run these job ids" to the broker;
* :mod:`orchestration.services`: the background loops, one per file, one shape.
"""
