"""Key check values: which keys the database's data needs (ids and check values, no key material).

Revision ID: 0005_h_newcomer
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_h_newcomer"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_checks",
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(300), nullable=False),
        sa.Column("check_value", sa.String(64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("purpose", "key_id", name=op.f("pk_key_checks")),
    )


def downgrade() -> None:
    op.drop_table("key_checks")
