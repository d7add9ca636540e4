"""Trainyard's Celery worker: one thin task, ``trainyard.run_job(job_id)``."""
