"""Subscription delivery state: backoff and heartbeat bookkeeping per subscription.

Revision ID: 0010_h_subs_delivery
Revises: 0010_h_subs
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_h_subs_delivery"
# Chained after subs-core's migration, which this branch merges (the integrator re-chains).
down_revision: str | None = "0010_h_subs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subscription_delivery_state",
        sa.Column(
            "subscription_id",
            sa.String(64),
            sa.ForeignKey("subscriptions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_outcome", sa.String(32), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("subscription_delivery_state")
