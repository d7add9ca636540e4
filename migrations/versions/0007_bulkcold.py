"""Bulk metrics, part 4: each epoch's metrics also as ``jsonb`` (PostgreSQL only), so picking
``keys`` out of 100,000 epochs (``POST /v1/metrics/bulk`` with nothing kept in the API process)
does not parse each epoch's JSON text once per key (:mod:`store.bulkread`; BENCHMARKS.md).

``job_metrics.values_b``: a stored generated column, ``CAST("values" AS jsonb)``, written by
PostgreSQL with the row (whoever writes it: no writer changes) and rewritten with it. ``values``
stays the one the application writes and reads (its text as written). A text that ``jsonb``
may not hold (any ``\\u`` escape: ``\\u0000`` and lone surrogates are refused; a number too large
for ``numeric``) gets NULL instead of failing the write; readers then use ``values``. SQLite (embedded mode) has no such column.

Revision ID: 0007_bulkcold
Revises: 0006_bulk2
Create Date: 2026-12-05 03:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007_bulkcold'
down_revision: str | None = '0006_bulk2'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the column, not in the models (PostgreSQL only); tests/service/test_migrations.py knows it
COLUMN = "values_b"
#: NULL, not a failed write, for a text json takes and jsonb does not: a \\u escape (\\u0000, a
#: lone surrogate), a number whose exponent may overflow numeric, or a run of 250 digits or more
EXPRESSION = ("CASE WHEN strpos(CAST(\"values\" AS TEXT), '\\u') = 0 "
              "AND CAST(\"values\" AS TEXT) !~ '[0-9]{250}|[eE][-+]?[0-9]{5}' THEN CAST(\"values\" AS jsonb) END")


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text(f"ALTER TABLE job_metrics ADD COLUMN {COLUMN} jsonb GENERATED ALWAYS AS ({EXPRESSION}) STORED"))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text(f"ALTER TABLE job_metrics DROP COLUMN {COLUMN}"))
