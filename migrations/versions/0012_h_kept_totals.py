"""Kept totals that do not grow with the store: ``grant_totals`` and retired grants.

An authority's unfiltered search total was a sum of ``disclosure_grants.current_matches`` over
its grants in force, a scan of every permitted migrant's grants. It is now read from
``grant_totals`` (the live sum per organization, purpose and type, kept by every change of a
grant's count) less the few grants not yet begun or ended and not yet retired
(``service.records.kept_totals``). The backfill sums the counts already kept; no grant is
retired yet (the first sweep retires those already ended).

Revision ID: 0012_h_kept_totals
Revises: 0011_h_delivery
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_h_kept_totals"
down_revision: str | None = "0011_h_delivery"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE_AND_ADMITTING = "current_matches > 0 AND retired_at IS NULL"
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("disclosure_grants") as batch:
        batch.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_index("ix_disclosure_grants_matches", table_name="disclosure_grants")
    for name, columns in (
        ("ix_disclosure_grants_matches", ["valid_from", "valid_to", "current_matches"]),
        ("ix_disclosure_grants_ending", ["valid_to", "current_matches"]),
    ):
        op.create_index(
            name,
            "disclosure_grants",
            ["organization_id", "purpose", "resource_type", *columns],
            postgresql_where=sa.text(LIVE_AND_ADMITTING),
            sqlite_where=sa.text(LIVE_AND_ADMITTING),
        )
    op.create_table(
        "grant_totals",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
    )
    op.create_index(
        "ix_grant_totals_key", "grant_totals", ["organization_id", "purpose", "resource_type", "delta"]
    )
    op.execute(
        "INSERT INTO grant_totals (organization_id, purpose, resource_type, delta)"
        " SELECT organization_id, purpose, resource_type, sum(current_matches) FROM disclosure_grants"
        " WHERE current_matches > 0 GROUP BY organization_id, purpose, resource_type"
    )


def downgrade() -> None:
    op.drop_index("ix_grant_totals_key", table_name="grant_totals")
    op.drop_table("grant_totals")
    op.drop_index("ix_disclosure_grants_ending", table_name="disclosure_grants")
    op.drop_index("ix_disclosure_grants_matches", table_name="disclosure_grants")
    with op.batch_alter_table("disclosure_grants") as batch:
        batch.drop_column("retired_at")
    op.create_index(
        "ix_disclosure_grants_matches",
        "disclosure_grants",
        ["organization_id", "purpose", "resource_type", "valid_from", "valid_to", "current_matches"],
        postgresql_where=sa.text("current_matches > 0"),
        sqlite_where=sa.text("current_matches > 0"),
    )
