"""Who is asking the API: a bearer token from the accounts file (core/access/tokens.py), or with
AUTH_MODE=none the local user, for clients on the server's own machine only.

  AUTH_MODE=none      no token: a client on 127.0.0.1 or ::1 is the local editor, as in the app;
                      any other client gets 403 (with no sign-in, the API must not reach the network).
  password and oidc   `Authorization: Bearer lk_<id>_<secret>`; 401 without one or with a wrong one.

Every request checks its token against the token's record in the accounts file (re-read only when
the file changes), so a token removed from the file is refused at once. The check is one SHA-256 of
the secret (core/access/tokens.py says why that is enough), so nothing is cached and nothing waits.
A token made when secrets were kept as argon2 hashes gets 401 with a message saying to have it made
again.

A token's id is public and its secret is 256 random bits, which nobody guesses; so the secret is
checked first and a right one is never refused, however many wrong ones others have sent for the
same id. Only wrong ones are counted by the sign-in throttle (core/access/throttle.py), per token id
and client address: a client that keeps sending wrong tokens gets 429 instead of 401.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from sqlalchemy.orm import sessionmaker
from starlette.requests import HTTPConnection

from core.access import accounts, tokens
from core.access.accounts import EDITOR, LOCAL_USER, Accounts, User
from core.access.throttle import SignInThrottle
from core.api.errors import BEARER, ApiError
from core.config import Settings
from core.errors import UserError

LOOPBACK = ("127.0.0.1", "::1")


class Authenticator:
    """The user of each API request (call `user` off the event loop: it reads files and the database)."""

    def __init__(self, settings: Settings, Session: sessionmaker) -> None:
        self.settings = settings
        self.throttle = SignInThrottle(Session)
        self._lock = threading.Lock()
        self._file: tuple[tuple[int, int], Accounts] | None = None  # (file stamp, its accounts)

    def user(self, request: HTTPConnection) -> User:
        """The user of `request`; ApiError (401, 403, 429, 503) when there is none."""
        try:
            mode = accounts.check_mode(self.settings.auth_mode)
        except UserError as e:
            raise ApiError(503, str(e)) from None
        address = request.client.host if request.client else None
        if mode == "none":
            if address not in LOOPBACK:
                raise ApiError(
                    403,
                    "AUTH_MODE is none (no sign-in), so the API answers only on the server's own "
                    "machine (127.0.0.1 or ::1). An administrator sets AUTH_MODE=password and gives "
                    "out API tokens for use from elsewhere.",
                )
            return LOCAL_USER
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "Send an API token: Authorization: Bearer lk_... (an administrator makes one with "
                "`python -m core token add NAME --role viewer`).",
                BEARER,
            )
        return self.token_user(token.strip(), address)

    def token_user(self, token: str, address: str | None) -> User:
        parts = tokens.split_token(token)
        if parts is None:
            raise ApiError(401, "That is not an API token of this server (lk_<id>_<secret>).", BEARER)
        try:
            user = tokens.token_user(self.accounts(), token)
        except tokens.OldToken as e:  # refused whatever its secret: nothing to guess, so nothing is counted
            raise ApiError(401, str(e), BEARER) from None
        if user is not None:
            return user
        try:  # the throttle keeps names as user names; a token's id has a prefix no user name can have
            self.throttle.failed(f"token:{parts[0]}", address)
        except UserError as e:
            wait = re.search(r"(\d+) s", str(e))
            raise ApiError(429, str(e), {"Retry-After": wait[1]} if wait else None) from None
        raise ApiError(401, "This API token is wrong or has been removed.", BEARER)

    def accounts(self) -> Accounts:
        """The accounts file, read again only when it changes; UserError (503) when it is broken."""
        path: Path = self.settings.accounts_file
        try:
            info = path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = (0, -1)
        with self._lock:
            if self._file is not None and self._file[0] == stamp:
                return self._file[1]
        try:
            found = accounts.load_accounts(path, missing_ok=True)
        except UserError as e:
            raise ApiError(503, str(e)) from None
        with self._lock:
            self._file = (stamp, found)
        return found


def require_editor(user: User, action: str) -> None:
    """ApiError 403 unless `user` is an editor."""
    if user.role != EDITOR:
        try:
            accounts.require_editor(user, action)
        except UserError as e:
            raise ApiError(403, str(e)) from None
