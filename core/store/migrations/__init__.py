"""The schema's history as Alembic revisions (versions/), and bringing a database to the newest.

versions/ holds one revision per schema change: 0001, the baseline, creates the schema as it was
when migrations began; each later one changes it (adds, renames, drops, backfills). `upgrade` runs
the ones a database lacks. core.store.engine.make_engine calls it once per database per process, and
`python -m core migrate` on demand. It tells three kinds of database apart:

- empty (none of our tables): every revision runs, from nothing;
- made before migrations (our tables, no alembic_version table): completed to the baseline as the
  old additive patch would have (legacy.py), stamped at the baseline, then upgraded;
- versioned: the revisions after its own run.

The app and its workers often start together, so two processes may find the same database behind.
The whole upgrade runs in one transaction that holds a lock first: PostgreSQL's advisory lock, or
SQLite's write lock (BEGIN IMMEDIATE). The one that comes second finds the work done; both have
transactional DDL, so a failed upgrade leaves the database as it was. A database already at the
newest revision (every start but the first after an upgrade) is only read, with no lock.

A new revision: change the models in core/store/db.py, then run
    .venv/bin/python -c "from core.store import migrations; print(migrations.new_revision('what changed'))"
which compares the models with a scratch database at the newest revision and writes what differs
as versions/NNNN_what_changed.py. Read it and fix it by hand (a rename comes out as a drop and an
add; a backfill is yours to write), then test it (tests/test_migrations.py).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Alembic tells at INFO each step it takes, on every start (the plugins it loads, the dialect it
# found): too much for the app's log. upgrade() logs one line where it changed the schema.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402

from core.errors import UserError  # noqa: E402
from core.store.migrations import legacy  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
SCHEMA_LOCK_KEY = 0x6C796D70686F6D61  # any constant; advisory locks are per database
log = logging.getLogger(__name__)

# Alembic runs a revision through module-level proxies (alembic.op, alembic.context), so two
# upgrades in one process, even of different databases, must not overlap.
_in_process = threading.Lock()


Found = Literal["empty", "made before migrations", "versioned"]


@dataclass(frozen=True)
class Upgrade:
    """What `upgrade` found and left: revisions, None where the database had none."""

    before: str | None
    after: str
    found: Found

    def said_before(self) -> str:
        return self.before if self.before else f"none ({self.found})"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, made in code: the scripts here, the connection for env.py."""
    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision."""
    newest = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert newest is not None
    return newest


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at; None if it has none (empty, or made before migrations)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> Upgrade:
    """Bring the database to the newest revision (see the module's docstring)."""
    newest = head()
    with engine.connect() as conn:
        now = current_revision(conn)
    if now == newest:
        return Upgrade(now, now, "versioned")
    with _in_process, schema_transaction(engine) as conn:
        done = _upgrade_locked(conn)
    if done.before != done.after:
        log.info("database schema upgraded: %s -> %s", done.said_before(), done.after)
    return done


def _upgrade_locked(conn: Connection) -> Upgrade:
    # Read again under the lock: another process may have upgraded the database meanwhile.
    before = current_revision(conn)
    found: Found = "versioned"
    script = ScriptDirectory.from_config(alembic_config())
    if before is not None and before not in {s.revision for s in script.walk_revisions()}:
        raise UserError(
            f"The database is at schema revision {before}, which this version of the app does not "
            f"know (its newest is {script.get_current_head()}): it was upgraded by a newer version."
        )
    if before is None:
        baseline = legacy.baseline_schema(Path(script.get_revision(BASELINE).path))
        found = "made before migrations" if legacy.has_tables_of(conn, baseline) else "empty"
        if found != "empty":
            lacking = legacy.missing(conn, baseline)
            if lacking:  # made by a version older than the baseline
                log.info("database made before migrations: adding %s", ", ".join(lacking))
                legacy.complete(conn, baseline)
            command.stamp(alembic_config(conn), BASELINE)
    command.upgrade(alembic_config(conn), "head")
    after = current_revision(conn)
    assert after is not None
    return Upgrade(before, after, found)


@contextlib.contextmanager
def schema_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that holds the database's schema lock from its first statement."""
    if engine.dialect.name == "sqlite":
        with _sqlite_schema_transaction(engine) as conn:
            yield conn
        return
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        yield conn


@contextlib.contextmanager
def _sqlite_schema_transaction(engine: Engine) -> Iterator[Connection]:
    """BEGIN IMMEDIATE (SQLite's one write lock, taken up front) with foreign keys off.

    SQLite changes most of a table by copying it (alembic's batch mode) and dropping the old one;
    with foreign keys on, that drop would delete the rows that refer to it (ON DELETE CASCADE).
    They are checked before the commit instead (only for new breaks: an old database may have
    some already), and switched on again for the pool's next user.
    """
    check = "PRAGMA foreign_key_check"
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: set it first
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                broken = set(conn.exec_driver_sql(check).fetchall())
                yield conn
                if new := set(conn.exec_driver_sql(check).fetchall()) - broken:
                    raise RuntimeError(f"a migration broke foreign keys (table, rowid, parent): {sorted(new)[:5]}")
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")
        finally:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")


def new_revision(message: str) -> Path:
    """Write versions/NNNN_<message>.py: what differs between the models and the newest revision."""
    with _in_process, tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{scratch}/scratch.db")
        try:
            with engine.begin() as conn:
                command.upgrade(alembic_config(conn), "head")
                script = command.revision(
                    alembic_config(conn), message=message, autogenerate=True, rev_id=f"{int(head()) + 1:04d}"
                )
        finally:
            engine.dispose()
    assert script is not None and not isinstance(script, list)
    return Path(script.path)
