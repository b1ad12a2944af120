"""Retry safety and stock clients: match keys on every type, remembered requests, default purposes.

``match_keys`` replaces ``patient_keys`` (same rows, with the resource type): an
``ifNoneExist`` identifier is claimed per (clinic, type, identifier) on every type a
clinic writes. ``idempotent_requests`` remembers what a write answered, keyed by an
``Idempotency-Key`` header (per client, for a limited time) or by a transaction's
``Bundle.identifier`` (per clinic, for good), so that a retry gets the original
answer. It holds references (type, id, version) and status lines, never resource
content: a replay re-reads the stored, encrypted versions. ``clients.default_purpose`` is the purpose of use
a token carries when the client's assertion names none.

Revision ID: 0005_h_retry
Revises: 0005_h_audit
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_h_retry"
down_revision: str | None = "0005_h_audit"  # chained after those already on main
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "match_keys",
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("identifier_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint(
            "organization_id", "resource_type", "identifier_hash", name=op.f("pk_match_keys")
        ),
    )
    op.execute(
        "INSERT INTO match_keys (organization_id, resource_type, identifier_hash, resource_id) "
        "SELECT organization_id, 'Patient', identifier_hash, patient_id FROM patient_keys"
    )
    op.drop_table("patient_keys")
    op.create_table(
        "idempotent_requests",
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("key_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("request_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("scope", "key_hash", name=op.f("pk_idempotent_requests")),
    )
    op.create_index("ix_idempotent_requests_expires_at", "idempotent_requests", ["expires_at"])
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("default_purpose", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("default_purpose")
    op.drop_index("ix_idempotent_requests_expires_at", table_name="idempotent_requests")
    op.drop_table("idempotent_requests")
    op.create_table(
        "patient_keys",
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("identifier_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "identifier_hash", name=op.f("pk_patient_keys")),
    )
    op.execute(
        "INSERT INTO patient_keys (organization_id, identifier_hash, patient_id) "
        "SELECT organization_id, identifier_hash, resource_id FROM match_keys "
        "WHERE resource_type = 'Patient'"
    )
    op.drop_table("match_keys")
