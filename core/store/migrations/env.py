"""Alembic's environment: runs the revisions on the connection that core/store/migrations gives it.

Nothing is read from an alembic.ini: the caller (core.store.migrations) puts the connection in
config.attributes["connection"], inside the transaction that holds the schema lock, and the
revisions run in that transaction. Base.metadata is the target that autogenerate compares with.
"""

from __future__ import annotations

from alembic import context

from core.store.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters little in place: autogenerate writes its changes as batch operations (copy the
    # table), which are plain ALTERs on PostgreSQL.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
