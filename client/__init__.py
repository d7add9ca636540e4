"""A small Python client for the Trainyard API (httpx) and the ``trainyard`` command line."""

from client.api import AsyncClient, Client, TrainyardError

__all__ = ["AsyncClient", "Client", "TrainyardError"]
