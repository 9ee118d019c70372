"""The accounts file (AUTH_FILE) from the command line: `accounts` (password accounts) and `token`
(API tokens). The password is asked twice, or read from stdin with --password-stdin:

    python -m core accounts add NAME --role editor|viewer [--replace] [--password-stdin]
    python -m core accounts remove NAME
    python -m core accounts list
    python -m core accounts hash            # prints a hash, for writing the file by other means
    python -m core token add NAME --role viewer|editor   # prints the token, once
    python -m core token list
    python -m core token remove ID

`python -m core.access.accounts ...`, where these commands were first, runs the same
(core/access/accounts.py `former_argv`).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from core.access import accounts, tokens
from core.cli.common import DefaultsFormatter, command
from core.config import Settings
from core.errors import UserError


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Same password again: ") != password:
        raise UserError("The two passwords differ; nothing was changed.")
    return password


def _sign_out_browsers(settings: Settings, name: str) -> None:
    """End the kept sign-ins of `name` (core/access/remembered.py), so that an account made again
    under the same name is not signed in by an old browser."""
    from core.access import remembered
    from core.store.engine import make_sessionmaker

    with make_sessionmaker(settings.database_url).begin() as s:
        count = remembered.forget_user(s, name)
    if count:
        print(f"signed {name} out of {count} browser(s)")


def cmd_accounts(args: argparse.Namespace, settings: Settings, Session) -> None:
    path = args.file or settings.accounts_file
    if args.accounts_command == "add":
        existed = args.name in accounts.load_accounts(path, missing_ok=True).accounts
        account = accounts.add_account(path, args.name, _read_password(args), args.role, replace=args.replace)
        print(f"{'updated' if existed else 'added'} {account.name} ({account.role}) in {path}")
        if existed:  # a new password: the browsers signed in with the old one sign in again
            _sign_out_browsers(settings, account.name)
    elif args.accounts_command == "remove":
        accounts.remove_account(path, args.name)
        print(f"removed {args.name} from {path}")
        _sign_out_browsers(settings, args.name)
    elif args.accounts_command == "list":
        found = accounts.load_accounts(path)
        for a in sorted(found.accounts.values(), key=lambda a: a.name):
            print(f"{a.name}\t{a.role}")
        for address, role in sorted(found.oidc_roles.items()):
            print(f"{address}\t{role}\t(oidc)")
    else:
        print(accounts.hash_password(_read_password(args)))


def cmd_token(args: argparse.Namespace, settings: Settings, Session) -> None:
    token_command(args.file or settings.accounts_file, args)


def add_token_commands(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser("token", help="API tokens: add, list, remove")
    commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = commands.add_parser("add", help="make a token and print it (once: only its hash is kept)")
    p.add_argument("name", help="whom the token acts as (runs it queues are recorded under this name)")
    p.add_argument("--role", choices=accounts.ROLES, required=True)
    commands.add_parser(
        "list",
        help="list tokens: id, name, role, when made (never the tokens); a fifth column "
        "marks an old token that is refused until it is made again",
    )
    p = commands.add_parser("remove", help="remove a token; it is refused from its next request on")
    p.add_argument("id", help="the token's id, as `token list` shows it")


def token_command(path: Path, args: argparse.Namespace) -> None:
    if args.token_command == "add":
        record, token = tokens.add_token(path, args.name, args.role)
        print(token)  # alone on stdout, so a script can capture it
        print(
            f"added token {record.id} for {record.name} ({record.role}) in {path}. It is shown only now: "
            "keep it somewhere safe.",
            file=sys.stderr,
        )
    elif args.token_command == "list":
        for t in sorted(accounts.load_accounts(path).tokens.values(), key=lambda t: (t.name, t.created_at)):
            old = "\told: refused, make it again" if tokens.is_old(t) else ""
            print(f"{t.id}\t{t.name}\t{t.role}\t{t.created_at}{old}")
    else:
        record = tokens.remove_token(path, args.id)
        print(f"removed token {record.id} of {record.name} from {path}")


def _add_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file", type=Path, default=None, help="the accounts file (default: AUTH_FILE, else APP_HOME/accounts.toml)"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "accounts",
        cmd_accounts,
        database=False,
        help="password accounts of the web app (AUTH_MODE=password) in AUTH_FILE: add, remove, list, hash",
    )
    _add_file_option(p)
    commands = p.add_subparsers(dest="accounts_command", required=True, metavar="COMMAND")
    p = commands.add_parser("add", help="add an account (asks for its password)", formatter_class=DefaultsFormatter)
    p.add_argument("name")
    p.add_argument("--role", choices=accounts.ROLES, required=True)
    p.add_argument("--replace", action="store_true", help="change the password and role of an existing account")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    p = commands.add_parser("remove", help="remove an account")
    p.add_argument("name")
    commands.add_parser("list", help="list accounts and OIDC roles (no hashes)")
    p = commands.add_parser("hash", help="print the hash of a password (asks for it)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")

    add_token_commands(sub)
    p = sub.choices["token"]
    p.formatter_class = DefaultsFormatter
    p.set_defaults(func=cmd_token, database=False)
    _add_file_option(p)
