"""Key rotations: when each access-token and audit log key came into use and left it.

Revision ID: 0007_h_otherkeys
Revises: 0006_h_jobs
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_h_otherkeys"
down_revision: str | None = "0006_h_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_rotations",
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(300), nullable=False),
        sa.Column("active_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("vkey", sa.Text(), nullable=True),
        sa.Column("first_size", sa.BigInteger(), nullable=True),
        sa.Column("last_size", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("purpose", "key_id", name=op.f("pk_key_rotations")),
    )


def downgrade() -> None:
    op.drop_table("key_rotations")
