"""label_checks: an image's class confirmed by an editor in a version of its dataset, so that it
leaves the list of suspected label errors until its class changes

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by create_all before migrations may have the table already.
    if "label_checks" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "label_checks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("checked_by", sa.String(length=200), nullable=False),
        sa.Column("checked_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_label_checks_dataset_id", "label_checks", ["dataset_id"])
    op.create_index("ix_label_checks_image_id", "label_checks", ["image_id"])


def downgrade() -> None:
    op.drop_index("ix_label_checks_image_id", table_name="label_checks")
    op.drop_index("ix_label_checks_dataset_id", table_name="label_checks")
    op.drop_table("label_checks")
