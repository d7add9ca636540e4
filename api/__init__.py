"""Trainyard's HTTP API (FastAPI). Never imports torch or ``worker``: jobs are dispatched by
task name after their row is committed."""
