"""Audit quarantine: rows the integrator found claiming a place in the tree it never gave them.

Revision ID: 0005_h_audit
Revises: 0005_h_version_mask
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_h_audit"
down_revision: str | None = "0005_h_version_mask"  # chained after those already on main
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_quarantine",
        sa.Column("entry_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("leaf_index", sa.BigInteger(), nullable=True),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=True),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_audit_quarantine")),
    )


def downgrade() -> None:
    op.drop_table("audit_quarantine")
