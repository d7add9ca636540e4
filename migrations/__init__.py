"""Alembic migrations over :mod:`store.models` (``render_as_batch=True`` so SQLite can ALTER)."""
