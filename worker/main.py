"""Entry module for the Celery command line: ``celery -A worker.main worker``. Building the app
here (and only here) is the Celery convention; everything else calls :func:`create_celery`."""

from worker.app import create_celery

app = create_celery()
