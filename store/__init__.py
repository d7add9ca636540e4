"""Trainyard's persistence layer: settings, SQLAlchemy models, sessions and repositories.

Shared by ``api/`` and ``worker/``; imports neither of them, nor torch.
"""
