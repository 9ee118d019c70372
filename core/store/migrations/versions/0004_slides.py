"""slides: the whole-slide images a dataset's tiles were cut from; datasets.tile_px and tile_mpp

Both new columns are nullable: a dataset from before has no recorded scale (NULL), as a dataset of
microscope fields ingested without one still has.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "slides" not in inspector.get_table_names():  # else made by create_all before migrations
        _create_slides()
    present = {c["name"] for c in inspector.get_columns("datasets")}
    # Tiles of `tile_px` pixels at `tile_mpp` microns per pixel; fields: tile_px NULL.
    if "tile_px" not in present:
        op.add_column("datasets", sa.Column("tile_px", sa.Integer(), nullable=True))
    if "tile_mpp" not in present:
        op.add_column("datasets", sa.Column("tile_mpp", sa.Double(), nullable=True))


def _create_slides() -> None:
    op.create_table(
        "slides",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("file_name", sa.String(length=200), nullable=False),
        sa.Column("source_path", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),  # slides pass 2 GB
        sa.Column("mtime", sa.Double(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("mpp", sa.Double(), nullable=False),
        sa.Column("vendor", sa.String(length=100), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("tiling", sa.Text(), nullable=False),
        sa.Column("tiles_kept", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id", "file_name"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_slides_dataset_id", "slides", ["dataset_id"])


def downgrade() -> None:
    for column in ("tile_mpp", "tile_px"):
        with op.batch_alter_table("datasets") as batch:
            batch.drop_column(column)
    op.drop_table("slides")
