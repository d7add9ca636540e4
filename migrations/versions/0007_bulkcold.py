"""Bulk metrics, part 4: each epoch's metrics also as ``jsonb`` (PostgreSQL only), so picking
``keys`` out of 100,000 epochs (``POST /v1/metrics/bulk`` with nothing kept in the API process)
does not parse each epoch's JSON text once per key (:mod:`store.bulkread`; BENCHMARKS.md).

``job_metrics.values_b``: a stored generated column, ``CAST("values" AS jsonb)``, written by
PostgreSQL with the row (whoever writes it: no writer changes) and rewritten with it. ``values``
stays the one the application writes and reads (its text as written). A text that ``jsonb``
may not hold (any ``\\u`` escape: ``\\u0000`` and lone surrogates are refused) gets NULL
instead of failing the write; readers then use ``values``. Its cost: ~4 us more per epoch row
written (the cast), and the rows take ~1.8x the space (47 -> 85 MB for 200,000 epochs of 7
values); the upgrade rewrites the table. SQLite (embedded mode) has no such column.

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
#: NULL, not a failed write, for a text json takes and jsonb may not: a \u escape (jsonb refuses
#: \u0000 and lone surrogates), or one of 100,000 bytes or more (an integer numeric cannot hold
#: has over 131,072 digits). Not checked (a regular expression cost ~10 us per row written, over
#: twice the cast): a number whose exponent numeric cannot take (from -16383 to 131071: e.g.
#: 1e-99999), which Python's json never writes (its floats stay within 1e-324..1.8e308); such a
#: row written by hand now fails, as it would in a jsonb column.
EXPRESSION = ("CASE WHEN octet_length(CAST(\"values\" AS TEXT)) < 100000 "
              "AND strpos(CAST(\"values\" AS TEXT), '\\u') = 0 THEN CAST(\"values\" AS jsonb) END")


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text(f"ALTER TABLE job_metrics ADD COLUMN {COLUMN} jsonb GENERATED ALWAYS AS ({EXPRESSION}) STORED"))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text(f"ALTER TABLE job_metrics DROP COLUMN {COLUMN}"))
