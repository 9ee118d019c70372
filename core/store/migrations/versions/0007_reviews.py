"""reviews: a reviewer's true class (or "cannot tell") for a logged prediction's image, with a note

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A database made by create_all before migrations may have the table already.
    if "reviews" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("log_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(length=64), nullable=False),
        sa.Column("predicted", sa.String(length=200), nullable=False),
        sa.Column("refer", sa.Boolean(), nullable=True),
        sa.Column("predicted_at", sa.DateTime(), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(), nullable=False),
        sa.Column("true_class", sa.String(length=200), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("log_id", "reviewer"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_reviews_log_id", "reviews", ["log_id"])
    op.create_index("ix_reviews_run_id", "reviews", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_reviews_run_id", table_name="reviews")
    op.drop_index("ix_reviews_log_id", table_name="reviews")
    op.drop_table("reviews")
