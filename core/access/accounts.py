"""Who may use the web app, and as what: users, roles, password accounts and the OIDC role map.

AUTH_MODE (core/config.py) picks how people sign in:
  none      no sign-in; everyone is LOCAL_USER, an editor called "local" (one person, own machine)
  password  accounts in the TOML file AUTH_FILE, each with an argon2id hash of its password
  oidc      Streamlit's st.login with an OpenID Connect provider ([auth] in .streamlit/secrets.toml);
            an address gets its role from the [oidc_roles] table of AUTH_FILE or from OIDC_ROLES.
            An address with no role is refused (a provider such as Google signs in anyone who has
            an account there); a "*" entry gives every other verified address a role.

Roles: a viewer browses datasets and runs and classifies images; an editor also uploads, trains,
cancels, deletes and saves presets. Core functions that change records take the acting `user` and
call `require_editor`, so a hidden button is not the only thing between a viewer and a change.

The accounts file, as `python -m core accounts add ana --role editor` writes it:

    [accounts.ana]
    password_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."
    role = "editor"

    [oidc_roles]
    "ana@lab.org" = "editor"
    "*" = "viewer"

    [tokens.3f9a1c2b7d4e]          # an API token (core/access/tokens.py): only its secret's SHA-256 digest
    name = "ci"
    role = "viewer"
    secret_hash = "sha256:..."     # and 64 hex digits
    created_at = "2026-01-31T09:00:00+00:00"

Command line (core/cli/accounts.py; the password is asked twice, or read from stdin with --password-stdin):
    python -m core accounts add NAME --role editor|viewer [--replace] [--password-stdin]
    python -m core accounts remove NAME
    python -m core accounts list
    python -m core accounts hash            # prints a hash, for writing the file by other means
    python -m core token add NAME --role viewer|editor   # prints the token, once
    python -m core token list
    python -m core token remove ID
`python -m core.access.accounts ARGS`, where these commands were first, still runs the same command.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from core.errors import UserError

if TYPE_CHECKING:
    from core.access.throttle import SignInThrottle

VIEWER, EDITOR = "viewer", "editor"
ROLES = (VIEWER, EDITOR)
MODES = ("none", "password", "oidc")
MIN_PASSWORD_LENGTH = 8
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_hasher = PasswordHasher()  # argon2id with the library's current recommended costs


@dataclass(frozen=True)
class User:
    """The person acting: a user name (or an OIDC address) and a role."""

    name: str
    role: str

    @property
    def can_edit(self) -> bool:
        return self.role == EDITOR


LOCAL_USER = User("local", EDITOR)


def require_editor(user: User, action: str = "change records") -> None:
    """UserError unless `user` is an editor."""
    if user.role != EDITOR:
        raise UserError(
            f"{user.name} is signed in as a {user.role}: only editors can {action}. "
            "Ask an administrator for the editor role."
        )


def check_mode(mode: str) -> str:
    """`mode` if it is a known AUTH_MODE; UserError otherwise (the app then lets nobody in)."""
    if mode not in MODES:
        raise UserError(
            f"AUTH_MODE is {mode!r}; it must be one of {', '.join(MODES)}. "
            "Nobody can sign in until an administrator fixes it."
        )
    return mode


def check_role(role: object, where: str) -> str:
    if role not in ROLES:
        raise UserError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}.")
    return str(role)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UserError(
            f"User name {name!r} is not usable: 1 to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit."
        )
    return name


# --------------------------------------------------------------------------------------------
# Passwords


def hash_password(password: str) -> str:
    """An argon2id hash of `password` (salted; the parameters are part of the hash)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"Passwords need at least {MIN_PASSWORD_LENGTH} characters.")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True if `password` matches `password_hash`; False for a wrong password or an unusable hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# --------------------------------------------------------------------------------------------
# The accounts file


@dataclass(frozen=True)
class Account:
    name: str
    password_hash: str
    role: str


@dataclass(frozen=True)
class ApiToken:
    """A bearer token of the HTTP API, as the file keeps it: never the token, only its secret's hash."""

    id: str  # the token's public part, lk_<id>_<secret>, by which it is looked up
    name: str  # whom it acts as: runs it queues are recorded under this name
    role: str
    secret_hash: str
    created_at: str  # ISO 8601


@dataclass
class Accounts:
    accounts: dict[str, Account] = field(default_factory=dict)
    oidc_roles: dict[str, str] = field(default_factory=dict)  # lower-case address (or "*") -> role
    tokens: dict[str, ApiToken] = field(default_factory=dict)  # token id -> token


def parse_accounts(text: str, source: str = "the accounts file") -> Accounts:
    """Accounts from the TOML text of an accounts file; UserError naming `source` for any mistake."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{source} is not valid TOML: {e}.") from None
    unknown = sorted(set(data) - {"accounts", "oidc_roles", "tokens"})
    if unknown:
        raise UserError(
            f"{source}: unknown section(s) {', '.join(unknown)}; expected [accounts.NAME], [oidc_roles] "
            "and [tokens.ID]."
        )
    table = data.get("accounts", {})
    if not isinstance(table, dict):
        raise UserError(f"{source}: 'accounts' must be a table of [accounts.NAME] sections.")
    result = Accounts()
    for name, entry in table.items():
        where = f"{source}, account {name!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a [accounts.{name}] section with password_hash and role.")
        try:
            check_name(name)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        extra = sorted(set(entry) - {"password_hash", "role"})
        if extra:
            raise UserError(f"{where}: unknown key(s) {', '.join(extra)}; only password_hash and role belong here.")
        password_hash = entry.get("password_hash")
        if not isinstance(password_hash, str) or not password_hash.startswith("$argon2"):
            raise UserError(
                f"{where}: password_hash must be an argon2 hash (python -m core.access.accounts hash makes one); "
                "plain-text passwords are not accepted."
            )
        result.accounts[name] = Account(name, password_hash, check_role(entry.get("role"), where))
    roles = data.get("oidc_roles", {})
    if not isinstance(roles, dict):
        raise UserError(f'{source}: \'oidc_roles\' must be a table of "address" = "role" lines.')
    for address, role in roles.items():
        result.oidc_roles[address.strip().lower()] = check_role(role, f"{source}, oidc_roles {address!r}")
    result.tokens = _parse_tokens(data.get("tokens", {}), source)
    return result


_TOKEN_ID = re.compile(r"[0-9a-f]{12}")
_SECRET_HASH = re.compile(r"sha256:[0-9a-f]{64}|\$argon2.+")


def _parse_tokens(table: object, source: str) -> dict[str, ApiToken]:
    """The [tokens.ID] sections of an accounts file."""
    if not isinstance(table, dict):
        raise UserError(f"{source}: 'tokens' must be a table of [tokens.ID] sections.")
    tokens = {}
    for token_id, entry in table.items():
        where = f"{source}, token {token_id!r}"
        if not _TOKEN_ID.fullmatch(token_id) or not isinstance(entry, dict):
            raise UserError(
                f"{where}: expected a [tokens.ID] section (ID: 12 hex digits) with name, role, "
                "secret_hash and created_at, as `python -m core token add` writes it."
            )
        keys = {"name", "role", "secret_hash", "created_at"}
        if set(entry) != keys or not all(isinstance(entry[k], str) for k in keys):
            raise UserError(f"{where}: needs exactly name, role, secret_hash and created_at, each a string.")
        # "$argon2...": a token made before secrets were kept as SHA-256 digests, refused when used
        # (core/access/tokens.py) but read, so that the rest of the file still works.
        if not _SECRET_HASH.fullmatch(entry["secret_hash"]):
            raise UserError(
                f"{where}: secret_hash must be sha256: and 64 hex digits, as `token add` writes it; "
                "tokens are never stored in plain text."
            )
        try:
            check_name(entry["name"])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        tokens[token_id] = ApiToken(
            token_id, entry["name"], check_role(entry["role"], where), entry["secret_hash"], entry["created_at"]
        )
    return tokens


def load_accounts(path: Path, *, missing_ok: bool = False) -> Accounts:
    """The accounts in `path`. A missing file is empty with `missing_ok`, a UserError otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return Accounts()
        raise UserError(
            f"No accounts file at {path}. An administrator adds the first account with "
            "`python -m core.access.accounts add NAME --role editor` (AUTH_FILE sets where it lives)."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"The accounts file {path} cannot be read: {e}.") from None
    return parse_accounts(text, f"The accounts file {path}")


def _toml_string(value: str) -> str:
    """A TOML basic string (TOML forbids raw control characters; JSON's escapes differ slightly)."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_accounts(accounts: Accounts) -> str:
    lines = [
        "# Accounts of the web app (AUTH_MODE=password) and roles of OIDC addresses (AUTH_MODE=oidc).",
        "# Passwords are stored only as argon2id hashes. `python -m core.access.accounts` rewrites this file",
        "# (comments are not kept).",
    ]
    for name in sorted(accounts.accounts):
        a = accounts.accounts[name]
        lines += [
            "",
            f"[accounts.{_toml_string(name)}]",
            f"password_hash = {_toml_string(a.password_hash)}",
            f"role = {_toml_string(a.role)}",
        ]
    if accounts.oidc_roles:
        lines += ["", "[oidc_roles]"]
        lines += [
            f"{_toml_string(address)} = {_toml_string(role)}" for address, role in sorted(accounts.oidc_roles.items())
        ]
    for token_id in sorted(accounts.tokens):
        t = accounts.tokens[token_id]
        lines += [
            "",
            f"[tokens.{_toml_string(t.id)}]",
            f"name = {_toml_string(t.name)}",
            f"role = {_toml_string(t.role)}",
            f"secret_hash = {_toml_string(t.secret_hash)}",
            f"created_at = {_toml_string(t.created_at)}",
        ]
    return "\n".join(lines) + "\n"


def write_accounts(path: Path, accounts: Accounts) -> None:
    """Write the file atomically (a temp file renamed over it), readable by its owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".accounts-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(format_accounts(accounts))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def add_account(path: Path, name: str, password: str, role: str, *, replace: bool = False) -> Account:
    """Add (or with `replace`, update) account `name` in the file at `path` (created if missing)."""
    check_name(name)
    check_role(role, f"Account {name!r}")
    accounts = load_accounts(path, missing_ok=True)
    if name in accounts.accounts and not replace:
        raise UserError(f"Account {name!r} already exists in {path}; add --replace to change its password or role.")
    account = Account(name, hash_password(password), role)
    accounts.accounts[name] = account
    write_accounts(path, accounts)
    return account


def remove_account(path: Path, name: str) -> None:
    accounts = load_accounts(path)
    if accounts.accounts.pop(name, None) is None:
        raise UserError(f"No account {name!r} in {path}.")
    write_accounts(path, accounts)


# --------------------------------------------------------------------------------------------
# Signing in


@cache
def _dummy_hash() -> str:
    return _hasher.hash("no account has this password")


def authenticate(accounts: Accounts, name: str, password: str) -> User | None:
    """The user whose name and password these are; None for an unknown name or a wrong password."""
    account = accounts.accounts.get(name.strip())
    if account is None:
        # Same cost as a wrong password for a known name: the timing does not tell which names exist.
        verify_password(_dummy_hash(), password)
        return None
    return User(account.name, account.role) if verify_password(account.password_hash, password) else None


def sign_in(
    accounts: Accounts, name: str, password: str, throttle: SignInThrottle | None = None, address: str | None = None
) -> User:
    """The signed-in user; UserError with one message for any wrong name or password.

    With a `throttle`, the attempt from `address` (None: the server's own machine) is counted
    before the password is checked, and refused while too many have failed (core/access/throttle.py).
    """
    name = name.strip()
    if not name or not password:
        raise UserError("Enter your user name and password.")
    if not _NAME.fullmatch(name):
        # No account can have it; refused before the throttle, so its counters' keys stay short.
        raise UserError("Wrong user name or password.")
    if throttle is not None:
        throttle.attempt(name, address)
    user = authenticate(accounts, name, password)
    if user is None:
        raise UserError("Wrong user name or password.")
    if throttle is not None:
        throttle.succeeded(name, address)
    return user


def parse_role_map(text: str, source: str = "OIDC_ROLES") -> dict[str, str]:
    """'ana@lab.org=editor,*=viewer' -> {"ana@lab.org": "editor", "*": "viewer"}; UserError if malformed."""
    roles: dict[str, str] = {}
    for item in text.replace(";", ",").split(","):
        if not item.strip():
            continue
        address, sep, role = item.partition("=")
        if not sep or not address.strip():
            raise UserError(f"{source}: {item.strip()!r} is not ADDRESS=ROLE.")
        roles[address.strip().lower()] = check_role(role.strip(), f"{source}, {address.strip()!r}")
    return roles


def oidc_user(roles: Mapping[str, str], email: str | None, email_verified: object = None) -> User | None:
    """The user an OIDC sign-in with `email` acts as; None when the address has no role.

    `roles` maps lower-case addresses (and "*" for any other) to roles. A provider that says the
    address is not verified gets no role: anyone could have typed it.
    """
    if not email or email_verified is False:
        return None
    role = roles.get(email.strip().lower(), roles.get("*"))
    return User(email.strip(), role) if role in ROLES else None


# --------------------------------------------------------------------------------------------
# Command line: `python -m core accounts ...` and `python -m core token ...` (core/cli/accounts.py)


def former_argv(argv: Sequence[str]) -> list[str]:
    """`python -m core.access.accounts ARGS` as the arguments of `python -m core` that do the same:
    `accounts ARGS`, or `token OPTIONS REST` for `OPTIONS token REST`."""
    words = list(argv)
    i = 0
    while i < len(words) and words[i].startswith("-"):  # options before the command: --file F, --help
        i += 2 if words[i] == "--file" else 1
    if words[i : i + 1] == ["token"]:
        return ["token", *words[:i], *words[i + 1 :]]
    return ["accounts", *words]


if __name__ == "__main__":
    # Where these commands were first, kept for scripts: the same command of `python -m core`, run in
    # this process's place (so that this library module does not import the command line).
    os.execv(sys.executable, [sys.executable, "-m", "core", *former_argv(sys.argv[1:])])
