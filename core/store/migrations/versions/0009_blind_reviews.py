"""reviews.blind: whether the reviewer gave their verdict without seeing the model's answer
(reviews recorded before are marked not blind, as they were made seeing it)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by create_all before migrations may have the column already.
    if "blind" in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("reviews")}:
        return
    op.add_column("reviews", sa.Column("blind", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("blind")
