"""browser_sign_ins: browsers kept signed in with a password, by the SHA-256 of their cookie

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "browser_sign_ins" in sa.inspect(op.get_bind()).get_table_names():
        return  # made by create_all in a database from before migrations
    op.create_table(
        "browser_sign_ins",
        sa.Column("cookie_sha256", sa.String(64), primary_key=True),
        sa.Column("user", sa.String(200), nullable=False),
        sa.Column("signed_in_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_browser_sign_ins_user", "browser_sign_ins", ["user"])
    op.create_index("ix_browser_sign_ins_expires_at", "browser_sign_ins", ["expires_at"])


def downgrade() -> None:
    op.drop_table("browser_sign_ins")
