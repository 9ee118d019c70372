"""Browsers kept signed in with a password, so that a reload or a new tab of the same browser does
not ask again (SIGN_IN_HOURS; 0: a sign-in lasts as long as its tab).

serve.py gives every browser an HttpOnly, SameSite=Lax cookie of 144 random bits on its first page
load (no script can read it; another site's page cannot send it with a form). A password sign-in
records the SHA-256 of that cookie here with the user and an expiry; a new browser session of the
same browser finds it and is signed in as that user while the account still exists (the sign-in
gate checks the accounts file at every click). Signing out forgets the browser; removing an account
(`python -m core.access.accounts remove`) forgets all of its browsers. The row holds a digest, never
the cookie, so a copy of the database signs nobody in. The sign-in throttle and the roles are checked
as before: this only replaces typing the password again.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.store.db import BrowserSignIn, utcnow

MIN_COOKIE_LENGTH = 16  # serve.py's cookies are 32 characters; anything shorter was not made by it


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


def remember(session: Session, cookie: str | None, user: str, hours: float) -> bool:
    """Keep `cookie`'s browser signed in as `user` for `hours`; False when it cannot be (no cookie, or
    SIGN_IN_HOURS is 0). Replaces whoever that browser was signed in as before."""
    if not cookie or len(cookie) < MIN_COOKIE_LENGTH or hours <= 0:
        return False
    now = utcnow()
    session.execute(delete(BrowserSignIn).where(BrowserSignIn.expires_at < now))  # pruned as it goes
    session.merge(
        BrowserSignIn(
            cookie_sha256=_digest(cookie), user=user, signed_in_at=now, expires_at=now + timedelta(hours=hours)
        )
    )
    return True


def recall(session: Session, cookie: str | None) -> str | None:
    """The user `cookie`'s browser is signed in as, while the sign-in has not expired."""
    if not cookie or len(cookie) < MIN_COOKIE_LENGTH:
        return None
    return session.scalar(
        select(BrowserSignIn.user).where(
            BrowserSignIn.cookie_sha256 == _digest(cookie), BrowserSignIn.expires_at > utcnow()
        )
    )


def forget(session: Session, cookie: str | None) -> None:
    """Sign `cookie`'s browser out (every tab of it)."""
    if cookie and len(cookie) >= MIN_COOKIE_LENGTH:
        session.execute(delete(BrowserSignIn).where(BrowserSignIn.cookie_sha256 == _digest(cookie)))


def forget_user(session: Session, user: str) -> int:
    """Sign every browser of `user` out; the number of browsers."""
    return session.execute(delete(BrowserSignIn).where(BrowserSignIn.user == user)).rowcount
