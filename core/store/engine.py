"""Engines and sessions: one engine per database per process, its schema brought up to date
by the migrations in core/store/migrations when the process first asks for it; the tables are in
core/store/db.py.

SQLite file by default, PostgreSQL by URL. Sessions are made by the caller
(`with Session.begin() as s:`) and passed in.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import sessionmaker


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the app read while a training job writes; busy_timeout waits for a writer
    # instead of failing at once with "database is locked".
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def new_engine(url: str) -> Engine:
    """A new engine for `url`, its schema untouched (make_engine is the one to use)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


# One engine per database per process: each engine has its own pool of connections, and the first
# brings the schema up to date. Weak, so that an engine nobody holds any more (a test's database)
# closes its connections; the app, its API and workers each hold theirs for the process's life.
_engines: weakref.WeakValueDictionary[str, Engine] = weakref.WeakValueDictionary()
_engines_lock = threading.Lock()


def make_engine(url: str) -> Engine:
    """This process's engine for the database at `url`, whose schema is brought to the newest
    revision (core/store/migrations) when the process first asks for it.

    An in-memory SQLite database belongs to its engine, so each call makes a new one.
    """
    from core.store import migrations  # it imports this module's models

    if _in_memory(url):
        engine = new_engine(url)
        migrations.upgrade(engine)
        return engine
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = new_engine(url)
            migrations.upgrade(engine)
            _engines[url] = engine
    return engine


def _in_memory(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and (
        parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
    )


def make_sessionmaker(url: str) -> sessionmaker:
    return sessionmaker(make_engine(url), expire_on_commit=False)


def engine_of(Session: sessionmaker) -> Engine:
    return Session.kw["bind"]


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the write lock from its first statement.

    SQLite: `BEGIN IMMEDIATE` takes the database's one write lock up front (waiting up to the
    busy timeout), so a read followed by an update in it cannot interleave with another writer.
    The driver's own transaction handling is switched off for this connection to allow that.
    Other databases: an ordinary transaction; row locks do the rest.
    """
    with engine.connect() as conn:
        if engine.dialect.name != "sqlite":
            with conn.begin():
                yield conn
            return
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")
