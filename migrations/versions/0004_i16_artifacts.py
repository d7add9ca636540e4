"""Exported models (TorchScript, ONNX, Keras) of a job's checkpoints, produced by a worker.

Revision ID: 0004_i16
Revises: 0004_i14
Create Date: 2026-12-04 17:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004_i16'
down_revision: str | None = '0004_i14'  # chained after issue 14's (merged first)
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigIntPK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        'artifacts',
        sa.Column('id', BigIntPK, autoincrement=True, nullable=False),
        sa.Column('job_id', sa.String(length=32), nullable=False),
        sa.Column('format', sa.String(length=16), nullable=False),
        sa.Column('checkpoint_sha256', sa.String(length=64), nullable=False),
        sa.Column('checkpoint_epoch', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('size', sa.BigInteger(), nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('data', sa.LargeBinary(), nullable=True),
        sa.Column('card', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_artifacts_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts')),
        sa.UniqueConstraint('job_id', 'format', 'checkpoint_sha256', name='uq_artifacts_job_format_checkpoint'),
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_job_id'), ['job_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_job_id'))
    op.drop_table('artifacts')
