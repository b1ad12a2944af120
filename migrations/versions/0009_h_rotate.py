"""The KEK version that wraps each subject key, so that a rotation can find what is left.

Filled from each wrapped key's own header (security.keys wrapped-key blob: format, KEK id,
KEK version), read in clear without decrypting anything. An erased subject (no wrapped key)
has none.

Revision ID: 0009_h_rotate
Revises: 0008_h_erase
Create Date: 2026-12-01
"""

import struct
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_h_rotate"
down_revision: str | None = "0008_h_erase"  # chained after what main holds
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 1000


def _kek_version(blob: bytes) -> int | None:
    # The header as security.keys.parse_wrapped reads it (a migration does not import the app).
    if len(blob) < 2 or blob[0] != 1 or len(blob) < 2 + blob[1] + 4:
        return None
    return int(struct.unpack_from(">I", blob, 2 + blob[1])[0])


def upgrade() -> None:
    with op.batch_alter_table("subjects") as batch:
        batch.add_column(sa.Column("kek_version", sa.Integer(), nullable=True))
    op.create_index("ix_subjects_kek_version", "subjects", ["kek_version"])
    connection = op.get_bind()
    subjects = sa.table(
        "subjects",
        sa.column("id", sa.String()),
        sa.column("wrapped_key", sa.LargeBinary()),
        sa.column("kek_version", sa.Integer()),
    )
    after = ""
    while True:
        rows = connection.execute(
            sa.select(subjects.c.id, subjects.c.wrapped_key)
            .where(subjects.c.id > after, subjects.c.wrapped_key.is_not(None))
            .order_by(subjects.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            break
        for row in rows:
            connection.execute(
                subjects.update()
                .where(subjects.c.id == row.id)
                .values(kek_version=_kek_version(bytes(row.wrapped_key)))
            )
        after = rows[-1].id


def downgrade() -> None:
    op.drop_index("ix_subjects_kek_version", table_name="subjects")
    with op.batch_alter_table("subjects") as batch:
        batch.drop_column("kek_version")
