"""Databases made before migrations: completed to the baseline revision, so that it can be stamped.

Before migrations, every start ran create_all (which makes missing tables) and an additive patch
(which added the columns a table had gained since: nullable ones, or ones with a server default).
Such a database has no alembic_version table. Made by the version the baseline was taken from, or by
a later one, it holds every table and column of the baseline; made by an older one, only some.
`complete` does once what that patch did, against the baseline's schema instead of today's models
(a later revision would otherwise find its own columns there already).

The baseline's schema is read from the baseline revision itself, so that it is written down once:
its upgrade() is run against a stand-in for alembic's `op` that collects the tables in a MetaData.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sqlalchemy import Index, MetaData, Table, inspect, text
from sqlalchemy.engine import Connection


class _Collector:
    """Stands in for alembic's `op` in the baseline's upgrade(): keeps what it would create."""

    def __init__(self) -> None:
        self.metadata = MetaData()

    def create_table(self, name: str, *items: Any, **kw: Any) -> Table:
        return Table(name, self.metadata, *items, **kw)

    def create_index(self, name: str, table: str, columns: list[str], **kw: Any) -> Index:
        return Index(name, *(self.metadata.tables[table].c[c] for c in columns), **kw)

    @staticmethod
    def f(name: str) -> str:
        return name


def baseline_schema(revision_file: Path) -> MetaData:
    """The tables (with their indexes) that the baseline revision in `revision_file` creates."""
    # A private copy of the module, so that alembic's own copy keeps the real `op`.
    spec = importlib.util.spec_from_file_location("_baseline_schema", revision_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    collector = _Collector()
    module.op = collector
    module.upgrade()
    return collector.metadata


def has_tables_of(conn: Connection, baseline: MetaData) -> bool:
    """Whether the database holds any of the baseline's tables (else it is empty, for us)."""
    return bool(set(inspect(conn).get_table_names()) & set(baseline.tables))


def missing(conn: Connection, baseline: MetaData) -> list[str]:
    """The baseline's tables, columns and indexes that the database lacks, as "table[.name]"."""
    found = inspect(conn)
    tables = set(found.get_table_names())
    lacking = []
    for table in baseline.sorted_tables:
        if table.name not in tables:
            lacking.append(table.name)
            continue
        columns = {c["name"] for c in found.get_columns(table.name)}
        indexes = {i["name"] for i in found.get_indexes(table.name)}
        lacking += [f"{table.name}.{c.name}" for c in table.columns if c.name not in columns]
        lacking += [f"{table.name}.{i.name}" for i in table.indexes if i.name not in indexes]
    return lacking


def complete(conn: Connection, baseline: MetaData) -> None:
    """Create the baseline's missing tables, add its missing columns and indexes, in conn's
    transaction (which holds the schema lock).

    Only columns that are nullable or have a server default can be added to a table with rows, as
    before: those are the only kind the models ever gained before migrations.
    """
    found = inspect(conn)
    existing = set(found.get_table_names())
    baseline.create_all(conn)  # only the missing tables, each with its indexes
    for table in baseline.sorted_tables:
        if table.name not in existing:
            continue
        have = {c["name"] for c in found.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:
                conn.execute(text(_add_column_sql(conn, table.name, column)))
        indexes = {i["name"] for i in found.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(conn)


def _add_column_sql(conn: Connection, table: str, column: Any) -> str:
    kind = column.type.compile(dialect=conn.dialect)
    default = f" DEFAULT {column.server_default.arg.text}" if column.server_default is not None else ""
    null = "" if column.nullable else " NOT NULL"
    return f'ALTER TABLE {table} ADD COLUMN "{column.name}" {kind}{default}{null}'
