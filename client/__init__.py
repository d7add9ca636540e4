"""A small Python client for the Trainyard API (httpx) and the ``trainyard`` command line."""

from client.api import Client, TrainyardError

__all__ = ["Client", "TrainyardError"]
