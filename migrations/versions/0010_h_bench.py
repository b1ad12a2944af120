"""Covering indexes for the authority's count: the first search page's total without heap reads.

An authority's search total counts every current version it may see: resources (type and
``_lastUpdated``), joined to the version row (its subject and label set), with a grant of
the same subject, type and label set in force. Each index below holds every column its
side of that statement reads, so PostgreSQL answers the count from the indexes alone
(no visit to the wide ``resource_versions`` rows, which carry the ciphertext); the versions
and the grants are both ordered by subject and label set, so that PostgreSQL matches them in
one merge pass instead of one index probe per resource. Plain key columns rather than INCLUDE, so
that SQLite gets the same covering indexes. The two narrower indexes they extend go.

Revision ID: 0010_h_bench
Revises: 0010_h_export
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010_h_bench"
down_revision: str | None = "0010_h_export"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_resources_type_page", "resources", ["resource_type", "last_updated", "id", "version_id"]
    )
    op.drop_index("ix_resources_type_updated", table_name="resources")
    op.create_index(
        "ix_resource_versions_grant_check",
        "resource_versions",
        ["resource_type", "subject_id", "labels_token", "id", "version_id"],
    )
    op.create_index(
        "ix_disclosure_grants_match",
        "disclosure_grants",
        [
            "organization_id",
            "purpose",
            "resource_type",
            "subject_id",
            "labels_token",
            "valid_from",
            "valid_to",
        ],
    )
    op.drop_index("ix_disclosure_grants_lookup", table_name="disclosure_grants")


def downgrade() -> None:
    op.create_index(
        "ix_disclosure_grants_lookup",
        "disclosure_grants",
        ["organization_id", "purpose", "resource_type", "subject_id"],
    )
    op.drop_index("ix_disclosure_grants_match", table_name="disclosure_grants")
    op.drop_index("ix_resource_versions_grant_check", table_name="resource_versions")
    op.create_index("ix_resources_type_updated", "resources", ["resource_type", "last_updated"])
    op.drop_index("ix_resources_type_page", table_name="resources")
