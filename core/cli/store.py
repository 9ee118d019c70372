"""Commands over the store itself: `check` (the database against the files under APP_HOME, `--fix`)
and `migrate` (the schema to this version's)."""

from __future__ import annotations

import argparse
import sys

from core.cli.common import command
from core.config import Settings


def cmd_check(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.store import consistency

    run = consistency.fix if args.fix else consistency.check
    report = run(Session, settings, deep=args.deep)
    print(report.format())
    sys.exit(1 if report.remaining else 0)


def cmd_migrate(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.store import migrations
    from core.store.engine import new_engine

    engine = new_engine(settings.database_url)
    try:
        done = migrations.upgrade(engine)
    finally:
        engine.dispose()
    print(f"before: {done.said_before()}")
    print(f"after: {done.after}")


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "check",
        cmd_check,
        help="compare the database with the files under APP_HOME; exit 1 when they disagree",
        description="Reports image rows whose file is missing or damaged, finished runs without "
        "a model file, files under images/ that no row references, leftovers of interrupted writes and "
        "uploads, and run folders without a run. Exit status 0: clean; 1: problems (after --fix: "
        "problems left).",
    )
    p.add_argument("--deep", action="store_true", help="also hash every stored image and read every model file (slow)")
    p.add_argument(
        "--fix",
        action="store_true",
        help="remove unreferenced files, temporary leftovers and folders of deleted runs (never database rows)",
    )

    # migrate reports the schema as it found it, before make_engine's upgrade: no Session for it.
    command(
        sub,
        "migrate",
        cmd_migrate,
        database=False,
        help="bring the database's schema to this version's "
        "(as every start does); prints its revision before and after",
    )
