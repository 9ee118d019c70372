"""Bearer tokens of the HTTP API (core/api), kept in the accounts file beside the password accounts.

A token reads `lk_<id>_<secret>`: the id (12 hex digits) is its public part, by which the server
finds its record; the secret (43 URL-safe characters, 256 random bits) is stored only as its SHA-256
digest, `secret_hash = "sha256:<64 hex digits>"`, so the file never holds a usable token. `token add`
prints the token once; a lost token is removed and replaced, never shown again. A token acts as NAME
with its own role (viewer or editor), whatever NAME's password account may be; removing it from the
file takes effect at its next request.

Why one SHA-256 and not a slow password hash: argon2 makes each guess at a password people choose
costly, because such passwords are few enough to try. 256 random bits are not: no number of fast
guesses finds one, so the digest is as safe and a check costs microseconds, on every request, with
no cache and no limit on checks at once (the usual way to keep random API tokens).
The digests are compared with hmac.compare_digest, whose time does not depend on how much of them
agrees.

Tokens made before this, whose secret_hash is an argon2 hash, are refused with a message that tells
their holder to have the token made again (`OldToken`); `token list` marks them. They are not
converted on first use: that would take the server writing the administrator's accounts file while
`token add` or `token remove` may be writing it too, and a token just removed could come back.

Command line: python -m core token add NAME --role viewer|editor | token list | token remove ID
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

from core.access.accounts import (
    Accounts,
    ApiToken,
    User,
    check_name,
    check_role,
    load_accounts,
    write_accounts,
)
from core.errors import UserError

PREFIX = "lk"
DIGEST_PREFIX = "sha256:"  # how secret_hash starts; an older file's argon2 hashes start with "$argon2"
_TOKEN = re.compile(PREFIX + r"_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NO_TOKEN = DIGEST_PREFIX + "0" * 64  # compared against for an unknown id, so that it costs the same


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token; None for anything else."""
    found = _TOKEN.fullmatch(token.strip())
    return (found[1], found[2]) if found else None


def secret_digest(secret: str) -> str:
    """What the accounts file keeps of a token's secret: `sha256:` and its SHA-256 in hex."""
    return DIGEST_PREFIX + hashlib.sha256(secret.encode()).hexdigest()


def is_old(record: ApiToken) -> bool:
    """A token made when secrets were kept as argon2 hashes: refused until it is made again."""
    return not record.secret_hash.startswith(DIGEST_PREFIX)


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
    record = ApiToken(token_id, name, role, secret_digest(secret), datetime.now(UTC).replace(microsecond=0).isoformat())
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


class OldToken(UserError):
    """The token's record holds an argon2 hash, from before secrets were kept as SHA-256 digests."""


def token_user(accounts: Accounts, token: str) -> User | None:
    """The user a token acts as; None for a malformed, unknown or wrong token. OldToken, whatever its
    secret, for a token whose record is an argon2 hash (module docstring)."""
    parts = split_token(token)
    if parts is None:
        return None
    token_id, secret = parts
    record = accounts.tokens.get(token_id)
    if record is not None and is_old(record):
        # Its holder is told what to do; the message names no one, as whoever sends the id reads it.
        raise OldToken(
            f"API token {token_id} dates from before tokens were stored as SHA-256 digests and is no "
            "longer accepted. Ask an administrator for a new one (`python -m core token "
            f"add NAME --role ROLE`) and to remove this one (`token remove {token_id}`)."
        )
    right = hmac.compare_digest(record.secret_hash if record else _NO_TOKEN, secret_digest(secret))
    return User(record.name, record.role) if record is not None and right else None
