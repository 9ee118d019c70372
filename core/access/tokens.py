"""Bearer tokens of the HTTP API (core/api), kept in the accounts file beside the password accounts.

A token reads `lk_<id>_<secret>`: the id (12 hex digits) is its public part, by which the server
finds its record without trying every hash; the secret (43 URL-safe characters, 256 random bits) is
stored only as an argon2id hash, so the file never holds a usable token. `token add` prints the
token once; a lost token is removed and replaced, never shown again. A token acts as NAME with its
own role (viewer or editor), whatever NAME's password account may be; removing it from the file
takes effect at its next request.

Checking a secret against its argon2id hash takes tens of milliseconds and tens of megabytes on
purpose, so at most CHECKS_AT_ONCE checks run at once in a process: a flood of wrong tokens waits
its turn instead of taking every core and the server's memory (`Busy` after CHECK_WAIT seconds).

Command line: python -m core.access.accounts token add NAME --role viewer|editor | token list | token remove ID
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import threading
from datetime import datetime, timezone
from functools import cache
from pathlib import Path

from core.access.accounts import (
    ROLES, Accounts, ApiToken, User, check_name, check_role, hash_password, load_accounts, verify_password,
    write_accounts,
)
from core.errors import UserError

PREFIX = "lk"
CHECKS_AT_ONCE = 4
CHECK_WAIT = 10.0  # seconds a check waits for its turn
_checks = threading.BoundedSemaphore(CHECKS_AT_ONCE)
_TOKEN = re.compile(PREFIX + r"_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token; None for anything else."""
    found = _TOKEN.fullmatch(token.strip())
    return (found[1], found[2]) if found else None


def add_token(path: Path, name: str, role: str) -> tuple[ApiToken, str]:
    """A new token for `name` with `role` in the accounts file at `path` (created if missing):
    its record and the token itself, which nothing stores."""
    check_name(name)
    check_role(role, f"Token for {name!r}")
    accounts = load_accounts(path, missing_ok=True)
    token_id = secrets.token_hex(6)
    while token_id in accounts.tokens:
        token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiToken(token_id, name, role, hash_password(secret),
                      datetime.now(timezone.utc).replace(microsecond=0).isoformat())
    accounts.tokens[token_id] = record
    write_accounts(path, accounts)
    return record, f"{PREFIX}_{token_id}_{secret}"


def remove_token(path: Path, token_id: str) -> ApiToken:
    """Remove the token `token_id` (its id, or the whole token) from the file; the removed record."""
    parts = split_token(token_id)
    token_id = parts[0] if parts else token_id.strip()
    accounts = load_accounts(path)
    record = accounts.tokens.pop(token_id, None)
    if record is None:
        raise UserError(f"No token {token_id!r} in {path}; `token list` shows the ids.")
    write_accounts(path, accounts)
    return record


@cache
def _dummy_hash() -> str:
    return hash_password("no token has this secret")


class Busy(Exception):
    """CHECKS_AT_ONCE token checks have been running for CHECK_WAIT seconds: try again shortly."""


def token_user(accounts: Accounts, token: str) -> User | None:
    """The user a token acts as; None for a malformed, unknown or wrong token. Busy when the
    process has been checking CHECKS_AT_ONCE other tokens for CHECK_WAIT seconds."""
    parts = split_token(token)
    if parts is None:
        return None
    record = accounts.tokens.get(parts[0])
    if not _checks.acquire(timeout=CHECK_WAIT):
        raise Busy
    try:
        # An unknown id costs a check too: the timing does not tell which ids exist. argon2's own
        # comparison takes the same time however much of the secret is right.
        right = verify_password(record.secret_hash if record else _dummy_hash(), parts[1])
    finally:
        _checks.release()
    return User(record.name, record.role) if record is not None and right else None


# --------------------------------------------------------------------------------------------
# Command line (under `python -m core.access.accounts`)


def add_token_commands(sub: argparse._SubParsersAction) -> None:
    token = sub.add_parser("token", help="API tokens: add, list, remove")
    commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    p = commands.add_parser("add", help="make a token and print it (once: only its hash is kept)")
    p.add_argument("name", help="whom the token acts as (runs it queues are recorded under this name)")
    p.add_argument("--role", choices=ROLES, required=True)
    commands.add_parser("list", help="list tokens: id, name, role, when made (never the tokens)")
    p = commands.add_parser("remove", help="remove a token; it is refused from its next request on")
    p.add_argument("id", help="the token's id, as `token list` shows it")


def token_command(path: Path, args: argparse.Namespace) -> None:
    if args.token_command == "add":
        record, token = add_token(path, args.name, args.role)
        print(token)  # alone on stdout, so a script can capture it
        print(f"added token {record.id} for {record.name} ({record.role}) in {path}. It is shown only now: "
              "keep it somewhere safe.", file=sys.stderr)
    elif args.token_command == "list":
        for t in sorted(load_accounts(path).tokens.values(), key=lambda t: (t.name, t.created_at)):
            print(f"{t.id}\t{t.name}\t{t.role}\t{t.created_at}")
    else:
        record = remove_token(path, args.id)
        print(f"removed token {record.id} of {record.name} from {path}")
