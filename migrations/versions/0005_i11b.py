"""Dashboards, part 2: finished jobs' compacted curves (job_curves), and sweep events in the
job_events table (a nullable job_id and a sweep_id), so the project stream carries a sweep's own
changes with the same increasing ids.

Revision ID: 0005_i11b
Revises: 0005_i12
Create Date: 2026-12-04 20:45:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005_i11b'
down_revision: str | None = '0005_i12'  # re-chained after main's 0005_i14b and 0005_i12 (all were on 0004_i11)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'job_curves',
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('n', sa.Integer(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_curves_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', name=op.f('pk_job_curves')),
    )
    with op.batch_alter_table('job_events') as batch:
        batch.alter_column('job_id', existing_type=sa.String(length=32), nullable=True)
        batch.add_column(sa.Column('sweep_id', sa.String(length=32), nullable=True))
        batch.create_foreign_key(op.f('fk_job_events_sweep_id_sweeps'), 'sweeps', ['sweep_id'], ['id'],
                                 ondelete='CASCADE')
    # jobs that finished before: their curves, compacted as a terminal move does now (store.curves)
    conn = op.get_bind()
    done = conn.execute(sa.text(
        "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
        "AND EXISTS (SELECT 1 FROM job_metrics m WHERE m.job_id = jobs.id)")).scalars().all()
    for job_id in done:
        texts = conn.execute(sa.text('SELECT CAST("values" AS TEXT) FROM job_metrics WHERE job_id = :j ORDER BY epoch'),
                             {"j": job_id}).scalars().all()
        conn.execute(sa.text("INSERT INTO job_curves (job_id, n, body) VALUES (:j, :n, :b)"),
                     {"j": job_id, "n": len(texts), "b": f"[{','.join(texts)}]"})


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM job_events WHERE job_id IS NULL"))
    with op.batch_alter_table('job_events') as batch:
        batch.drop_constraint(op.f('fk_job_events_sweep_id_sweeps'), type_='foreignkey')
        batch.drop_column('sweep_id')
        batch.alter_column('job_id', existing_type=sa.String(length=32), nullable=False)
    op.drop_table('job_curves')
