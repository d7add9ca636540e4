"""Projects and API keys (jobs and datasets belong to a project), sweeps (trials are jobs),
leases with fencing tokens and max_attempts on jobs, and the dispatch outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        'projects',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('max_concurrent_jobs', sa.Integer(), nullable=True),
        sa.Column('requests_per_minute', sa.Integer(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_projects')),
        sa.UniqueConstraint('name', name=op.f('uq_projects_name')),
    )
    # every existing job and dataset belongs to the default project
    op.execute(sa.text("INSERT INTO projects (id, name, created_at) VALUES ('default', 'default', CURRENT_TIMESTAMP)"))

    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('project_id', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=True),
        sa.Column('prefix', sa.String(length=16), nullable=False),
        sa.Column('key_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_api_keys_project_id_projects'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
        sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash')),
    )
    op.create_index(op.f('ix_api_keys_project_id'), 'api_keys', ['project_id'], unique=False)

    op.create_table(
        'sweeps',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('project_id', sa.String(length=32), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('method', sa.String(length=16), nullable=False),
        sa.Column('config', sa.JSON(), nullable=False),
        sa.Column('objective_metric', sa.String(length=100), nullable=False),
        sa.Column('objective_mode', sa.String(length=8), nullable=False),
        sa.Column('max_trials', sa.Integer(), nullable=False),
        sa.Column('max_concurrent', sa.Integer(), nullable=False),
        sa.Column('trials_created', sa.Integer(), nullable=False),
        sa.Column('best_job_id', sa.String(length=32), nullable=True),
        sa.Column('best_value', sa.String(length=40), nullable=True),
        sa.Column('stop_reason', sa.String(length=32), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_sweeps_project_id_projects')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_sweeps')),
    )
    op.create_index(op.f('ix_sweeps_project_id'), 'sweeps', ['project_id'], unique=False)
    op.create_index(op.f('ix_sweeps_status'), 'sweeps', ['status'], unique=False)
    op.create_index(op.f('ix_sweeps_created_at'), 'sweeps', ['created_at'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('project_id', sa.String(length=32), server_default='default', nullable=False))
        batch_op.add_column(sa.Column('sweep_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('trial_number', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('trial_params', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('max_attempts', sa.Integer(), server_default='3', nullable=False))
        batch_op.add_column(sa.Column('lease_token', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_foreign_key(batch_op.f('fk_jobs_project_id_projects'), 'projects', ['project_id'], ['id'])
        batch_op.create_foreign_key(batch_op.f('fk_jobs_sweep_id_sweeps'), 'sweeps', ['sweep_id'], ['id'], ondelete='CASCADE')
        batch_op.create_index(batch_op.f('ix_jobs_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_sweep_id'), ['sweep_id'], unique=False)
        # Idempotency-Keys become unique per project
        batch_op.drop_constraint('uq_jobs_idempotency_key', type_='unique')
        batch_op.create_unique_constraint(
            batch_op.f('uq_jobs_project_id_idempotency_key'), ['project_id', 'idempotency_key']
        )

    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('project_id', sa.String(length=32), server_default='default', nullable=False))
        batch_op.create_foreign_key(batch_op.f('fk_datasets_project_id_projects'), 'projects', ['project_id'], ['id'])
        batch_op.create_index(batch_op.f('ix_datasets_project_id'), ['project_id'], unique=False)

    op.create_table(
        'outbox',
        sa.Column('id', BigIntPK, autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('queue', sa.String(length=100), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_outbox_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox')),
    )
    op.create_index(op.f('ix_outbox_job_id'), 'outbox', ['job_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_outbox_job_id'), table_name='outbox')
    op.drop_table('outbox')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_project_id'))
        batch_op.drop_constraint(batch_op.f('fk_datasets_project_id_projects'), type_='foreignkey')
        batch_op.drop_column('project_id')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_jobs_project_id_idempotency_key'), type_='unique')
        batch_op.create_unique_constraint(batch_op.f('uq_jobs_idempotency_key'), ['idempotency_key'])
        batch_op.drop_index(batch_op.f('ix_jobs_sweep_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_project_id'))
        batch_op.drop_constraint(batch_op.f('fk_jobs_sweep_id_sweeps'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('fk_jobs_project_id_projects'), type_='foreignkey')
        for col in ('lease_token', 'max_attempts', 'trial_params', 'trial_number', 'sweep_id', 'project_id'):
            batch_op.drop_column(col)
    op.drop_index(op.f('ix_sweeps_created_at'), table_name='sweeps')
    op.drop_index(op.f('ix_sweeps_status'), table_name='sweeps')
    op.drop_index(op.f('ix_sweeps_project_id'), table_name='sweeps')
    op.drop_table('sweeps')
    op.drop_index(op.f('ix_api_keys_project_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('projects')
