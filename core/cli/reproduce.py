"""`python -m core reproduce-paper DATASET`: the paper's protocol and the honest one, trained and
reported (core/jobs/reproduce.py does the work)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from core.cli.common import cli_user
from core.config import Settings
from core.jobs.reproduce import reproduce_paper
from core.training import run_config


class _StageLog:
    """Progress for the terminal: one stderr line per stage, and a line at most every 5 s within it."""

    def __init__(self) -> None:
        self.stage, self.last = None, 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage or done >= total or now - self.last >= 5:
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)
            self.stage, self.last = stage, now


# The settings reproduce-paper lets one change; the rest are the paper's (both protocols are run).
RUN_FLAGS = ("epochs", "image_size", "per_class", "batch_size", "weights", "seed", "device")


def cmd_reproduce_paper(args: argparse.Namespace, settings: Settings, Session: sessionmaker) -> None:
    base = run_config.from_flags(
        args, RUN_FLAGS, dataset=args.dataset, weights=args.weights or settings.default_weights
    )
    out = Path(args.out) if args.out else settings.app_home / "reports" / f"reproduce-{args.dataset}"
    path = reproduce_paper(Session, settings, args.dataset, base, out, progress=_StageLog(), user=cli_user(args))
    print(path)


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `reproduce-paper DATASET`; its handler is set as `func(args, settings, Session)`."""
    p = subparsers.add_parser(
        "reproduce-paper",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train under the paper's (leaky) protocol and the honest one; write a Markdown report",
        description="Train the same model twice, under the paper's protocol (augment, then split: leaky) and the "
        "honest one (split first, by specimen group when the dataset has groups), and write report.md with "
        "both Table I layouts, confusion matrices, training curves, a leak audit and a verdict. "
        "Defaults are the paper's settings; prints the report's path.",
    )
    p.add_argument("dataset", help="name of an ingested dataset")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: APP_HOME/reports/reproduce-DATASET)")
    run_config.add_flags(p, RUN_FLAGS)
    p.set_defaults(func=cmd_reproduce_paper)
    return p
