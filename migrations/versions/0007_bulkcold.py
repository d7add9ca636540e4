"""Bulk metrics, part 4: each epoch's metrics also as ``jsonb`` (PostgreSQL only), so picking
``keys`` out of 100,000 epochs (``POST /v1/metrics/bulk`` with nothing kept in the API process)
does not parse each epoch's JSON text once per key (:mod:`store.bulkread`; BENCHMARKS.md).

``job_metrics.values_b``: a stored generated column, ``CAST("values" AS jsonb)``, written by
PostgreSQL with the row (whoever writes it: no writer changes) and rewritten with it. ``values``
stays the one the application writes and reads (its text as written). A text that ``jsonb``
may not hold (any ``\\u`` escape: ``\\u0000`` and lone surrogates are refused) gets NULL
instead of failing the write; readers then use ``values``; so does one whose jsonb text of a
value would read otherwise than the stored text (see ``EXPRESSION``). Its cost: ~4.5 us more
per epoch row written (the cast and the check), rows ~1.8x as large (47 -> 85 MB for 200,000
epochs of 7 values), and the upgrade rewrites the table. SQLite (embedded mode) has no such
column.

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
_T = 'CAST("values" AS TEXT)'
#: Not in it (the text of the epoch's values has no copy): what a reader could not take from
#: jsonb as the stored text says it, found by one regular expression (~1 us per row written;
#: the cast ~3.5 us; 24 substring searches instead cost ~13 us):
#:
#: - a \u escape (jsonb refuses \u0000 and lone surrogates: the row is written anyway);
#: - a number with an exponent that is not negative (e+, E+, e or E then a digit): jsonb writes
#:   1e+300 as a 301-digit integer, which reads as another number; "e-" is kept (1e-05 is written
#:   0.00001: the same float);
#: - a negative zero (-0.0, -0.00..., -0e...): jsonb drops its sign (-0.05 is kept);
#: - a text of 100,000 bytes or more (numeric holds at most 131,072 digits).
#:
#: (Conservative: the same characters inside a string or a key also leave the row without a copy.)
#: So a reader takes any value from the copy when there is one, with no check per value. Not
#: checked: an exponent numeric cannot take (below -16383), which Python's json never writes (its
#: floats stop at 1e-324); such a row written by hand now fails, as it would in a jsonb column.
UNSAFE = r"\\u|[eE][+0-9]|-0[eE]|-0[.]0+([^0-9]|$)"
EXPRESSION = (f"CASE WHEN octet_length({_T}) < 100000 AND {_T} !~ '{UNSAFE}' "
              'THEN CAST("values" AS jsonb) END')


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text(f"ALTER TABLE job_metrics ADD COLUMN {COLUMN} jsonb GENERATED ALWAYS AS ({EXPRESSION}) STORED"))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text(f"ALTER TABLE job_metrics DROP COLUMN {COLUMN}"))
