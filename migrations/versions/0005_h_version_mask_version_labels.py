"""Sensitivity labels per resource version: consent decides on the version it serves.

The label-set token moves from the current pointer (``resources``) to every row
of ``resource_versions``, so that vread and history of an older version match
disclosure grants on that version's own labels, never on the current one's.

Current versions take the token their pointer had. Older versions written
before this revision have no token: they match no grant, so authorities do
not see them (fail closed) until they are relabelled; clinics see them as
before.

Revision ID: 0005_h_version_mask
Revises: 0005_h_newcomer
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_h_version_mask"
down_revision: str | None = "0005_h_newcomer"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("resource_versions") as batch:
        batch.add_column(sa.Column("labels_token", sa.LargeBinary(32), nullable=True))
    op.execute(
        "UPDATE resource_versions SET labels_token = ("
        " SELECT r.labels_token FROM resources r"
        " WHERE r.resource_type = resource_versions.resource_type"
        " AND r.id = resource_versions.id AND r.version_id = resource_versions.version_id)"
    )
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("labels_token")


def downgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("labels_token", sa.LargeBinary(32), nullable=True))
    op.execute(
        "UPDATE resources SET labels_token = ("
        " SELECT v.labels_token FROM resource_versions v"
        " WHERE v.resource_type = resources.resource_type"
        " AND v.id = resources.id AND v.version_id = resources.version_id)"
    )
    with op.batch_alter_table("resource_versions") as batch:
        batch.drop_column("labels_token")
