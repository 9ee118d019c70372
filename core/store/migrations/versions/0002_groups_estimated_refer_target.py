"""datasets.groups_estimated and prediction_log.refer_target

Both nullable: rows from before say "not known" (NULL). A database made before migrations may
have them already (the additive patch that ran at every start before migrations added new columns),
so each is added only where it is missing.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def columns() -> list[tuple[str, sa.Column]]:
    # Made anew for each call: a Column belongs to the one table it is added to.
    return [
        # True: the dataset's specimen groups were estimated from file numbers, not given.
        ("datasets", sa.Column("groups_estimated", sa.Boolean(), nullable=True)),
        # The accuracy the refer band's threshold promises for the predictions it lets through.
        ("prediction_log", sa.Column("refer_target", sa.Double(), nullable=True)),
    ]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table, column in columns():
        if column.name not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, column)


def downgrade() -> None:
    for table, column in columns():
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column.name)
