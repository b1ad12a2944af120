"""Blind-index key rotation: which index key each migrant's tokens are under, and the rotation.

Revision ID: 0011_h_index_rotation
Revises: 0010_h_subs_delivery
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_h_index_rotation"
down_revision: str | None = "0010_h_subs_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL: written before index keys were recorded, i.e. under the one index key there was;
    # `mhr keys rotate-index` names it on every such row before anything moves.
    with op.batch_alter_table("subjects") as batch:
        batch.add_column(sa.Column("index_key_id", sa.String(64), nullable=True))
        batch.create_index("ix_subjects_index_key_id", ["index_key_id"])
    with op.batch_alter_table("idempotent_requests") as batch:
        batch.add_column(sa.Column("index_key_id", sa.String(64), nullable=True))
    op.create_table(
        "index_key_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("current_kid", sa.String(64), nullable=False),
        sa.Column("previous_kid", sa.String(64), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_index_key_state")),
    )


def downgrade() -> None:
    op.drop_table("index_key_state")
    with op.batch_alter_table("idempotent_requests") as batch:
        batch.drop_column("index_key_id")
    with op.batch_alter_table("subjects") as batch:
        batch.drop_index("ix_subjects_index_key_id")
        batch.drop_column("index_key_id")
