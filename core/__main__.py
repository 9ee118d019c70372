"""Command line: python -m core COMMAND ... (python -m core COMMAND --help for each).

A thin front end over the library, like the web pages. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from core.cli import accounts, card, data, predict, results, review, runs, store
from core.cli.runs import config_from_args
from core.config import load_settings
from core.errors import UserError
from core.store.engine import make_sessionmaker

# torch/torchvision take seconds to import; commands import what they need so --help stays quick.

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(database=True)  # a command registered with database=False gets no Session
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for topic in (data, runs, results, card, review, predict, store, accounts):
        topic.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a UserError, from whichever command, prints one `error:` line and exits 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        settings = load_settings()
        Session = make_sessionmaker(settings.database_url) if args.database else None
        args.func(args, settings, Session)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
