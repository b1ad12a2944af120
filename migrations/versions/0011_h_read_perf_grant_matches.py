"""A count kept with each disclosure grant: the current resources it admits.

An authority's search total used to join every current resource with the grants (at 100k
exams, 7.5x the cost of the same first page at 1k). Each grant now carries how many of its
migrant's current versions have its resource type and exact label set, kept in the
transaction of every change to either side (``RecordRepository.refresh_grant_matches``), so
that the total of an unfiltered search is a sum over the authority's grants in force now,
read from one partial covering index. The backfill below computes it for every grant.

Revision ID: 0011_h_read_perf
Revises: 0010_h_subs_delivery
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_h_read_perf"
down_revision: str | None = "0011_h_index_rotation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "disclosure_grants",
        sa.Column("current_matches", sa.Integer(), nullable=False, server_default="0"),
    )
    op.execute(
        "UPDATE disclosure_grants SET current_matches = ("
        " SELECT count(*) FROM resource_versions v JOIN resources r"
        " ON r.resource_type = v.resource_type AND r.id = v.id AND r.version_id = v.version_id"
        " WHERE v.resource_type = disclosure_grants.resource_type"
        " AND v.subject_id = disclosure_grants.subject_id"
        " AND v.labels_token = disclosure_grants.labels_token)"
    )
    op.create_index(
        "ix_disclosure_grants_matches",
        "disclosure_grants",
        ["organization_id", "purpose", "resource_type", "valid_from", "valid_to", "current_matches"],
        postgresql_where=sa.text("current_matches > 0"),
        sqlite_where=sa.text("current_matches > 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_disclosure_grants_matches", table_name="disclosure_grants")
    with op.batch_alter_table("disclosure_grants") as batch:
        batch.drop_column("current_matches")
