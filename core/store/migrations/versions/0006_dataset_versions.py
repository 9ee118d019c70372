"""dataset_versions and dataset_version_images: each state of a dataset's contents, numbered per dataset

Every dataset that has none becomes version 1: its images as they are now, each with its class and
group. Who made that state and when is not known any more, so version 1 says when it was recorded
and names nobody. A database made by create_all before migrations may have the tables already, empty
of versions: they are created only where missing, and filled either way.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FIRST_NOTE = "the images the dataset held when dataset versions began"

# The tables as this revision knows them, for the backfill (not the models: they may change later).
datasets = sa.table("datasets", sa.column("id", sa.Integer()), sa.column("classes", sa.JSON()))
images = sa.table(
    "images",
    sa.column("id", sa.Integer()),
    sa.column("dataset_id", sa.Integer()),
    sa.column("label", sa.String()),
    sa.column("group", sa.String()),
)
versions = sa.table(
    "dataset_versions",
    sa.column("id", sa.Integer()),
    sa.column("dataset_id", sa.Integer()),
    sa.column("number", sa.Integer()),
    sa.column("created_at", sa.DateTime()),
    sa.column("created_by", sa.String()),
    sa.column("note", sa.Text()),
    sa.column("counts", sa.JSON()),
)
members = sa.table(
    "dataset_version_images",
    sa.column("version_id", sa.Integer()),
    sa.column("image_id", sa.Integer()),
    sa.column("label", sa.String()),
    sa.column("group", sa.String()),
)


def upgrade() -> None:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    if "dataset_versions" not in present:  # else made by create_all before migrations
        _create_tables()
    _first_versions()


def _create_tables() -> None:
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dataset_id", "number"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_dataset_versions_dataset_id", "dataset_versions", ["dataset_id"])
    op.create_table(
        "dataset_version_images",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("group", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["version_id"], ["dataset_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("version_id", "image_id"),
    )
    op.create_index("ix_dataset_version_images_image_id", "dataset_version_images", ["image_id"])


def _first_versions() -> None:
    """Version 1 of every dataset without a version: its images, classes and groups as they are."""
    conn = op.get_bind()
    versioned = sa.select(versions.c.dataset_id)
    now = datetime.now(UTC).replace(tzinfo=None)
    for dataset_id, classes in conn.execute(
        sa.select(datasets.c.id, datasets.c.classes).where(datasets.c.id.not_in(versioned))
    ).all():
        counts = dict(
            conn.execute(
                sa.select(images.c.label, sa.func.count())
                .where(images.c.dataset_id == dataset_id)
                .group_by(images.c.label)
            ).all()
        )
        conn.execute(
            sa.insert(versions).values(
                dataset_id=dataset_id,
                number=1,
                created_at=now,
                created_by=None,
                note=FIRST_NOTE,
                counts={c: counts.get(c, 0) for c in classes},
            )
        )
        version_id = conn.scalar(
            sa.select(versions.c.id).where(versions.c.dataset_id == dataset_id, versions.c.number == 1)
        )
        conn.execute(
            sa.insert(members).from_select(
                ["version_id", "image_id", "label", "group"],
                sa.select(sa.literal(version_id, sa.Integer()), images.c.id, images.c.label, images.c.group).where(
                    images.c.dataset_id == dataset_id
                ),
            )
        )


def downgrade() -> None:
    op.drop_table("dataset_version_images")
    op.drop_table("dataset_versions")
