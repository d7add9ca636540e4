"""Fair share between projects (issue 14): projects.weight, and the indexes the fair-share pick
reads (a project's best queued job in a queue; the jobs of a queue that finished recently);
jobs.preempt_requested (optional preemption).

Revision ID: 0005_i14b
Revises: 0004_i11
Create Date: 2026-12-04 20:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005_i14b'
down_revision: str | None = '0004_i11'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('projects') as batch:
        batch.add_column(sa.Column('weight', sa.Float(), server_default='1', nullable=False))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('preempt_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.create_index('ix_jobs_queue_status_project_priority',
                           ['queue', 'status', 'project_id', 'priority', 'created_at'])
        batch.create_index('ix_jobs_queue_finished_at', ['queue', 'finished_at'])


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_queue_finished_at')
        batch.drop_index('ix_jobs_queue_status_project_priority')
        batch.drop_column('preempt_requested')
    with op.batch_alter_table('projects') as batch:
        batch.drop_column('weight')
