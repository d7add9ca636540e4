"""Dashboards: labels and notes on jobs and sweeps, a numeric best value to sort jobs by, and
the indexes of the list's sort orders.

Revision ID: 0004_i11
Revises: 0004_i16
Create Date: 2026-12-04 17:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004_i11'
down_revision: str | None = '0004_i16'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ('jobs', 'sweeps'):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('labels', sa.JSON(), server_default='{}', nullable=False))
            batch.add_column(sa.Column('notes', sa.Text(), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('best_number', sa.Float(), nullable=True))
        batch.create_index('ix_jobs_project_id_updated_at_id', ['project_id', 'updated_at', 'id'])
        batch.create_index('ix_jobs_project_id_best_number_id', ['project_id', 'best_number', 'id'])
    # jobs that finished before: their best value as a number where it is a finite one
    op.execute(sa.text(
        "UPDATE jobs SET best_number = CAST(best_value AS FLOAT) WHERE best_value IS NOT NULL "
        "AND best_value NOT IN ('NaN', 'Infinity', '-Infinity')"
    ))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_project_id_best_number_id')
        batch.drop_index('ix_jobs_project_id_updated_at_id')
        batch.drop_column('best_number')
    for table in ('sweeps', 'jobs'):
        with op.batch_alter_table(table) as batch:
            batch.drop_column('notes')
            batch.drop_column('labels')
