"""Bulk Data export: the kick-offs with their checkpoints, and their output files.

Revision ID: 0010_h_export
Revises: 0009_h_rotate
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_h_export"
down_revision: str | None = "0009_h_rotate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bulk_exports",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(64), nullable=False),
        sa.Column("group_id", sa.String(64), nullable=True),
        sa.Column("types", sa.JSON(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request_url", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("cursor_subject", sa.String(64), nullable=True),
        sa.Column("subjects_done", sa.Integer(), nullable=False),
        sa.Column("resources_done", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.String(300), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_bulk_exports"),
    )
    op.create_index("ix_bulk_exports_client_id", "bulk_exports", ["client_id"])
    op.create_table(
        "bulk_export_files",
        sa.Column("export_id", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("byte_length", sa.BigInteger(), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("resources", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["export_id"], ["bulk_exports.id"], name="fk_bulk_export_files_export_id_bulk_exports"
        ),
        sa.PrimaryKeyConstraint("export_id", "resource_type", name="pk_bulk_export_files"),
    )


def downgrade() -> None:
    op.drop_table("bulk_export_files")
    op.drop_index("ix_bulk_exports_client_id", table_name="bulk_exports")
    op.drop_table("bulk_exports")
