"""slide_jobs: whole slides classified in the background, with their progress and results;
prediction_log.size_bytes as a 64-bit integer, since a slide's file often passes 2 GB

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "slide_jobs" not in sa.inspect(op.get_bind()).get_table_names():  # else made by create_all before
        _create_slide_jobs()
    # SQLite rebuilds the table: keep its ids never given again (AUTOINCREMENT), as the model says.
    with op.batch_alter_table("prediction_log", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.alter_column("size_bytes", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)


def _create_slide_jobs() -> None:
    op.create_table(
        "slide_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("slide_name", sa.String(length=200), nullable=False),
        sa.Column("slide_path", sa.Text(), nullable=False),
        sa.Column("uploaded", sa.Boolean(), nullable=False),
        sa.Column("mpp", sa.Double(), nullable=True),
        sa.Column("user", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=10), nullable=False),
        sa.Column(
            "status",
            sa.Enum("queued", "running", "succeeded", "failed", "cancelled", name="runstatus", native_enum=False),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_slide_jobs_run_id", "slide_jobs", ["run_id"])
    op.create_index("ix_slide_jobs_status", "slide_jobs", ["status"])


def downgrade() -> None:
    with op.batch_alter_table("prediction_log", table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.alter_column("size_bytes", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
    op.drop_table("slide_jobs")
