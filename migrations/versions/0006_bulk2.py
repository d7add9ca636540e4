"""Bulk metrics, part 3: each job's metrics revision, so ``POST /v1/metrics/bulk`` checks the
epochs the API process keeps with one column of the job's row instead of every epoch row's
``xmin`` (:mod:`store.bulkread`).

- ``jobs.metrics_top``: the highest epoch ever written for the job;
- ``jobs.metrics_rewrites``: bumped whenever an epoch row that a reader may already have read is
  overwritten, deleted, or written below ``metrics_top`` (a gap filled). Appending epochs above
  ``metrics_top`` leaves it unchanged: a reader that kept epochs up to k with the same count only
  needs the epochs after k.

:func:`store.repo.record_progress` (the writer of epoch rows) sets both in the UPDATE of the job's
row it already makes, in the same transaction. On PostgreSQL, a row trigger on ``job_metrics``
also bumps ``metrics_rewrites`` for any UPDATE or DELETE of an epoch row, whoever runs it (an
upsert that overwrites, an operator's statement), and drops the job's compacted curve
(:mod:`store.curves`; ``record_progress`` already does for its own writes); inserting rows never
fires it.

Revision ID: 0006_bulk2
Revises: 0005_i14a
Create Date: 2026-12-05 00:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006_bulk2'
down_revision: str | None = '0005_i14a'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTION = """
CREATE FUNCTION trainyard_metrics_rewritten() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs SET metrics_rewrites = metrics_rewrites + 1 WHERE id = OLD.job_id;
    DELETE FROM job_curves WHERE job_id = OLD.job_id;
    RETURN NULL;
END $$
"""
TRIGGER = ("CREATE TRIGGER job_metrics_rewritten AFTER UPDATE OR DELETE ON job_metrics "
           "FOR EACH ROW EXECUTE FUNCTION trainyard_metrics_rewritten()")


def upgrade() -> None:
    op.add_column('jobs', sa.Column('metrics_top', sa.Integer(), nullable=False, server_default='0'))
    op.add_column('jobs', sa.Column('metrics_rewrites', sa.Integer(), nullable=False, server_default='0'))
    op.execute(sa.text(
        "UPDATE jobs SET metrics_top = (SELECT max(m.epoch) FROM job_metrics m WHERE m.job_id = jobs.id) "
        "WHERE EXISTS (SELECT 1 FROM job_metrics m WHERE m.job_id = jobs.id)"))
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text(FUNCTION))
        op.execute(sa.text(TRIGGER))


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute(sa.text("DROP TRIGGER job_metrics_rewritten ON job_metrics"))
        op.execute(sa.text("DROP FUNCTION trainyard_metrics_rewritten()"))
    # a plain ALTER TABLE on SQLite too (3.35+): a batch copy of the table would drop the old
    # ``jobs``, and with foreign keys on that deletes every row referencing it (ON DELETE CASCADE)
    op.drop_column('jobs', 'metrics_rewrites')
    op.drop_column('jobs', 'metrics_top')
