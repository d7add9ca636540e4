"""Process-wide tuning shared by the API and the worker."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Move every object built so far (the imported libraries: torch, SQLAlchemy, Celery...) into
    the garbage collector's permanent generation (``gc.freeze``), so a full collection no longer
    walks them, and run young-generation collections every 10,000 allocations instead of 700, which
    makes full ones (a walk over whatever came later) 14 times rarer. Call once start-up imports
    are done (``config.settings.Settings.gc_freeze``). In the API a full collection walked ~110k
    objects (~70 ms, a stall of every request in flight); in a worker with torch and scikit-learn
    loaded, ~440k (~100 ms each, landing in the middle of a pack: bench/packing.py's packs of 32
    took 0.45 s, and 0.7 s when one landed)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
