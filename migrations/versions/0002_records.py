"""Encrypted resource store: subjects (wrapped keys), current resources, versions, blind indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subjects",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subjects")),
    )
    op.create_table(
        "resources",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("clinical_date", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_resources_organization_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["subject_id"], ["subjects.id"], name=op.f("fk_resources_subject_id_subjects")
        ),
        sa.PrimaryKeyConstraint("resource_type", "id", name=op.f("pk_resources")),
    )
    op.create_index(
        "ix_resources_org_type_updated", "resources", ["organization_id", "resource_type", "last_updated"]
    )
    op.create_index("ix_resources_subject_type", "resources", ["subject_id", "resource_type"])
    op.create_index("ix_resources_type_updated", "resources", ["resource_type", "last_updated"])
    op.create_table(
        "resource_versions",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext_sha256", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["subject_id"], ["subjects.id"], name=op.f("fk_resource_versions_subject_id_subjects")
        ),
        sa.PrimaryKeyConstraint("resource_type", "id", "version_id", name=op.f("pk_resource_versions")),
    )
    op.create_index(op.f("ix_resource_versions_subject_id"), "resource_versions", ["subject_id"])
    op.create_table(
        "search_tokens",
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("param", sa.String(32), nullable=False),
        sa.Column("value", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("resource_type", "id", "param", "value", name=op.f("pk_search_tokens")),
    )
    op.create_index("ix_search_tokens_lookup", "search_tokens", ["resource_type", "param", "value"])
    op.create_table(
        "patient_keys",
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("identifier_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "identifier_hash", name=op.f("pk_patient_keys")),
    )


def downgrade() -> None:
    op.drop_table("patient_keys")
    op.drop_index("ix_search_tokens_lookup", table_name="search_tokens")
    op.drop_table("search_tokens")
    op.drop_index(op.f("ix_resource_versions_subject_id"), table_name="resource_versions")
    op.drop_table("resource_versions")
    op.drop_index("ix_resources_type_updated", table_name="resources")
    op.drop_index("ix_resources_subject_type", table_name="resources")
    op.drop_index("ix_resources_org_type_updated", table_name="resources")
    op.drop_table("resources")
    op.drop_table("subjects")
