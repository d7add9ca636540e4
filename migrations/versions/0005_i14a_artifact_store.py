"""Artifacts out of the database: checkpoints, resume snapshots and exports move to the artifact
store (TRAINYARD_ARTIFACTS_URL, store/artifact_store.py); their rows keep size, sha256 and the
file's key (``uri``).

The upgrade writes every stored blob to the store (one row at a time: a blob is held once, never
a table's worth), records its key and drops the ``data`` columns. Writing the same bytes again
lands on the same key, so a migration that failed half-way is simply run again. The downgrade
reads the files back into the database (a snapshot whose file is gone is dropped: its job then
restarts from its beginning if it is ever resumed; a checkpoint's bytes are then NULL, as for one
whose bytes were not kept).

Revision ID: 0005_i14a
Revises: 0005_i11b
Create Date: 2026-12-04 21:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005_i14a'
down_revision: str | None = '0005_i11b'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ('checkpoints', 'snapshots', 'artifacts')


def _key(table: str, row: sa.Row) -> str:
    from store.artifact_store import checkpoint_key, export_key, snapshot_key

    if table == 'checkpoints':
        return checkpoint_key(row.job_id, row.sha256)
    if table == 'snapshots':
        return snapshot_key(row.job_id, row.sha256)
    return export_key(row.job_id, row.format, row.sha256)


def _ids(table: str) -> str:
    return 'job_id' if table == 'snapshots' else 'id'


def upgrade() -> None:
    from store.artifact_store import get_store

    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('uri', sa.String(length=400), nullable=True))
    bind = op.get_bind()
    store = get_store()
    for table in TABLES:
        pk = _ids(table)
        extra = ', format' if table == 'artifacts' else ''
        ids = [r[0] for r in bind.execute(sa.text(f'SELECT {pk} FROM {table} WHERE data IS NOT NULL'))]
        for ident in ids:
            row = bind.execute(sa.text(f'SELECT job_id, sha256{extra}, data FROM {table} WHERE {pk} = :i'),
                               {'i': ident}).one()
            data = bytes(row.data)
            stored = store.put(_key(table, row), data, row.sha256 or None)
            bind.execute(sa.text(f'UPDATE {table} SET uri = :u, size = :n WHERE {pk} = :i'),
                         {'u': stored.uri, 'n': stored.size, 'i': ident})
            del data, row
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column('data')
            if table == 'snapshots':
                batch.alter_column('uri', existing_type=sa.String(length=400), nullable=False)


def downgrade() -> None:
    from store.artifact_store import ArtifactError, get_store

    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('data', sa.LargeBinary(), nullable=True))
    bind = op.get_bind()
    store = get_store()
    for table in TABLES:
        pk = _ids(table)
        rows = list(bind.execute(sa.text(f'SELECT {pk}, uri, sha256, size FROM {table} WHERE uri IS NOT NULL')))
        for ident, uri, sha256, size in rows:
            try:
                data = store.read(uri, sha256, size)
            except ArtifactError:
                if table == 'snapshots':
                    bind.execute(sa.text('DELETE FROM snapshots WHERE job_id = :i'), {'i': ident})
                continue
            bind.execute(sa.text(f'UPDATE {table} SET data = :d WHERE {pk} = :i'), {'d': data, 'i': ident})
    bind.execute(sa.text('DELETE FROM snapshots WHERE data IS NULL'))
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column('uri')
            if table == 'snapshots':
                batch.alter_column('data', existing_type=sa.LargeBinary(), nullable=False)
