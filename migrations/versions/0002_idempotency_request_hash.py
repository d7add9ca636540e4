"""jobs.idempotency_hash: sha256 of the canonical request body stored with its Idempotency-Key,
so the same key with a different body is refused (409) instead of answering with the old job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 09:52:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('idempotency_hash', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('idempotency_hash')
