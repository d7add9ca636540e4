"""Entry module for the Celery command line: ``celery -A worker.main worker``. Building the app
here (and only here) is the Celery convention; everything else calls :func:`create_celery`.
Logging is configured here too, before Celery's own start-up checks warn (config.logs): every
line of a worker process has the one format."""

from config.logs import configure_logging
from config.settings import get_settings
from worker.app import create_celery

configure_logging(get_settings(), "worker")
app = create_celery()
