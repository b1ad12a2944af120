"""Subscription delivery claims: which job is sending a subscription's notifications, until when.

Revision ID: 0011_h_delivery
Revises: 0010_h_subs_delivery
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_h_delivery"
down_revision: str | None = "0011_h_read_perf"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("subscription_delivery_state") as batch:
        batch.add_column(sa.Column("claim_job_id", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("claim_token", sa.String(32), nullable=True))
        batch.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("subscription_delivery_state") as batch:
        batch.drop_column("claimed_until")
        batch.drop_column("claim_token")
        batch.drop_column("claim_job_id")
