"""Subscriptions (R5 Backport IG for R4): an authority's subscriptions and their numbered events.

Revision ID: 0010_h_subs
Revises: 0009_h_rotate
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_h_subs"
down_revision: str | None = "0009_h_rotate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=False),
        sa.Column("payload_type", sa.String(64), nullable=False),
        sa.Column("payload_content", sa.String(16), nullable=False),
        sa.Column("headers_sealed", sa.LargeBinary(), nullable=True),
        sa.Column("heartbeat_seconds", sa.Integer(), nullable=True),
        sa.Column("timeout_seconds", sa.Integer(), nullable=True),
        sa.Column("max_count", sa.Integer(), nullable=True),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("events_issued", sa.BigInteger(), nullable=False),
        sa.Column("events_delivered", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.String(300), nullable=True),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_subscriptions_organization_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_index("ix_subscriptions_organization_id", "subscriptions", ["organization_id"])
    op.create_index("ix_subscriptions_org_topic", "subscriptions", ["organization_id", "topic", "status"])
    op.create_table(
        "subscription_events",
        sa.Column("subscription_id", sa.String(64), nullable=False),
        sa.Column("event_number", sa.BigInteger(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("focus_type", sa.String(64), nullable=False),
        sa.Column("focus_id", sa.String(64), nullable=False),
        sa.Column("focus_version", sa.Integer(), nullable=True),
        sa.Column("subject_id", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_subscription_events_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("subscription_id", "event_number", name=op.f("pk_subscription_events")),
    )


def downgrade() -> None:
    op.drop_table("subscription_events")
    op.drop_index("ix_subscriptions_org_topic", table_name="subscriptions")
    op.drop_index("ix_subscriptions_organization_id", table_name="subscriptions")
    op.drop_table("subscriptions")
