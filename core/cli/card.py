"""`card`: a succeeded run's model card, as Markdown or HTML (core/jobs/model_card.py), printed or
written to a file."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli.common import command
from core.config import Settings
from core.errors import UserError


def cmd_card(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs import model_card
    from core.store.files import write_bytes_atomic

    with Session() as s:
        card = model_card.model_card(s, settings, args.run)
    text = model_card.to_html(card) if args.html else model_card.to_markdown(card)
    if args.out is None:
        print(text)
        return
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder: the card cannot be written there.")
    write_bytes_atomic(out, text.encode("utf-8"))
    print(out)


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "card",
        cmd_card,
        help="a succeeded run's model card: intended use, data, protocol, metrics with intervals, "
        "calibration, approvals and the model file's sha256",
        description="Markdown by default, or a standalone HTML page with --html; every name in it is "
        "escaped, so it shows as text whatever it holds.",
    )
    p.add_argument("run", type=int)
    p.add_argument("--html", action="store_true", help="write HTML instead of Markdown")
    p.add_argument("--out", help="the file to write (default: print to standard output)")
