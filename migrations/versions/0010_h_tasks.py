"""Follow-up tasks: one row per case (exam needing follow-up x receiving authority) and its
custody changes. Only routing, dates and the outcome code are in clear (see SECURITY.md).

Revision ID: 0010_h_tasks
Revises: 0009_h_rotate
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_h_tasks"
down_revision: str | None = "0009_h_rotate"  # chained after what main holds
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "followup_tasks",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(64), nullable=False),
        sa.Column("focus_id", sa.String(64), nullable=False),
        sa.Column("origin_org", sa.String(64), nullable=False),
        sa.Column("owner_org", sa.String(64), nullable=False),
        sa.Column("requester_org", sa.String(64), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("business_status", sa.String(32), nullable=True),
        sa.Column("authored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("arrival_date", sa.Date(), nullable=True),
        sa.Column("due_date", sa.Date(), nullable=False),
        sa.Column("evaluated_on", sa.Date(), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("outcome_response_id", sa.String(64), nullable=True),
        sa.Column("outcome_shared", sa.Boolean(), nullable=False),
        sa.Column("overdue_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["subject_id"], ["subjects.id"], name=op.f("fk_followup_tasks_subject_id_subjects")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_followup_tasks")),
        sa.UniqueConstraint("focus_id", "origin_org", name=op.f("uq_followup_tasks_focus_id_origin_org")),
    )
    op.create_index("ix_followup_tasks_subject_id", "followup_tasks", ["subject_id"])
    op.create_index("ix_followup_tasks_requester_org", "followup_tasks", ["requester_org"])
    op.create_index(
        "ix_followup_tasks_owner_status_due", "followup_tasks", ["owner_org", "status", "due_date"]
    )
    op.create_index("ix_followup_tasks_status_due", "followup_tasks", ["status", "due_date"])
    op.create_table(
        "followup_transfers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("from_org", sa.String(64), nullable=False),
        sa.Column("to_org", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["followup_tasks.id"],
            name=op.f("fk_followup_transfers_task_id_followup_tasks"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_followup_transfers")),
    )
    op.create_index("ix_followup_transfers_task_id", "followup_transfers", ["task_id"])


def downgrade() -> None:
    op.drop_index("ix_followup_transfers_task_id", table_name="followup_transfers")
    op.drop_table("followup_transfers")
    op.drop_index("ix_followup_tasks_status_due", table_name="followup_tasks")
    op.drop_index("ix_followup_tasks_owner_status_due", table_name="followup_tasks")
    op.drop_index("ix_followup_tasks_requester_org", table_name="followup_tasks")
    op.drop_index("ix_followup_tasks_subject_id", table_name="followup_tasks")
    op.drop_table("followup_tasks")
