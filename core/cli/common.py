"""What the commands share: who acts, how each command is registered, how help shows defaults."""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Callable

from core.access.accounts import EDITOR, User
from core.access.limits import check_name_length


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default after its text, unless the text says it already (in its own
    words, e.g. "(default: your login name)") or there is nothing to say (no value, or a switch off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def command(
    sub: argparse._SubParsersAction, name: str, func: Callable, *, database: bool = True, **options
) -> argparse.ArgumentParser:
    """Register `name`, run as `func(args, settings, Session)`; Session is None with database=False
    (commands over files alone, and migrate, which reports the schema before anything upgrades it)."""
    parser = sub.add_parser(name, formatter_class=DefaultsFormatter, **options)
    parser.set_defaults(func=func, database=database)
    return parser


def cli_user(args: argparse.Namespace) -> User:
    """Who the records are by: --user, else the operating-system user. The command line has the
    database at hand, so it acts as an editor whatever the web app's AUTH_MODE."""
    name = getattr(args, "user", None)
    if not name:
        try:
            name = getpass.getuser()
        except (OSError, KeyError):  # no login name and no passwd entry (some containers)
            name = "cli"
    return User(check_name_length(name, "User name"), EDITOR)
