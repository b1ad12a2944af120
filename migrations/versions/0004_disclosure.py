"""Consent-scoped disclosure: label tokens on resources and materialised disclosure grants.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("labels_token", sa.LargeBinary(32), nullable=True))
    op.create_table(
        "disclosure_grants",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("labels_token", sa.LargeBinary(32), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("consent_id", sa.String(64), nullable=False),
        sa.Column("consent_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["subject_id"], ["subjects.id"], name=op.f("fk_disclosure_grants_subject_id_subjects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disclosure_grants")),
    )
    op.create_index(
        "ix_disclosure_grants_lookup",
        "disclosure_grants",
        ["organization_id", "purpose", "resource_type", "subject_id"],
    )
    op.create_index("ix_disclosure_grants_subject", "disclosure_grants", ["subject_id"])


def downgrade() -> None:
    op.drop_index("ix_disclosure_grants_subject", table_name="disclosure_grants")
    op.drop_index("ix_disclosure_grants_lookup", table_name="disclosure_grants")
    op.drop_table("disclosure_grants")
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("labels_token")
