"""The sign-in throttle: failed sign-ins counted in the database, so that guessing is slow, without
letting anyone lock the real holder of a name or a token out.

Nothing here imports streamlit; the sign-in form passes the user name and the client's address, the
API (core/api/auth.py) a token's id and the client's address.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import sessionmaker

from core.errors import UserError
from core.store.db import SignInFailures, utcnow
from core.store.engine import engine_of, write_transaction

LOCAL_ADDRESS = "local"  # the address of a client on the server's own machine (Streamlit reports none)


@dataclass(frozen=True)
class Limit:
    """`max_failures` failed sign-ins, each within `lock_seconds` of the one before, lock for
    `lock_seconds` after the last; a counter with no failure for `lock_seconds` starts again at 0."""

    max_failures: int
    lock_seconds: float


class SignInThrottle:
    """Slows password guessing without letting anyone lock a colleague out at will.

    Every sign-in attempt is counted under three keys before its password is checked:
      pair     the name at the client's address: `pair` failures lock that name for that address
               only, so guesses from elsewhere cannot keep the name's owner out;
      address  the address, whatever the name: `address` failures lock the address, so one client
               cannot try many names (or lock many colleagues) in turn;
      name     the name, from all addresses together. Past the `name` limit it refuses no one, as
               its count is fed by other addresses: the right password from an address of its own
               still signs in. It makes guessing spread over many addresses slow instead: while it
               is over its limit, one attempt at the name locks the pair at once, so each address
               has one try at that name per `pair` lock time.
    An attempt that the pair or the address refuses checks no password and counts nothing.
    Checking the counters and adding the attempt are one write transaction (SQLite: BEGIN
    IMMEDIATE; PostgreSQL: the rows locked FOR UPDATE), so attempts sent at once cannot all pass
    the check before any is counted. A right password takes its attempt back: it clears the pair's
    count and takes one off the address and the name (an attacker's own account cannot wipe out
    the address's count). Rows whose last failure is older than the longest lock are pruned.

    API tokens (`failed`) hold 256 random bits, which no one guesses: their secret is checked first
    and only a wrong one is counted, so the throttle never refuses a right token.
    """

    def __init__(
        self,
        Session: sessionmaker,
        *,
        pair: Limit = Limit(5, 60),
        address: Limit = Limit(20, 300),
        name: Limit = Limit(50, 300),
    ) -> None:
        self.engine = engine_of(Session)
        self.limits = {"pair": pair, "address": address, "name": name}

    @staticmethod
    def keys(name: str, address: str | None) -> dict[str, str]:
        address = (address or LOCAL_ADDRESS)[:64]
        return {"pair": f"pair {name} {address}", "address": f"address {address}", "name": f"name {name}"}

    def attempt(self, name: str, address: str | None) -> None:
        """Count a sign-in of `name` from `address` as failed; UserError, counting nothing, while
        its pair or its address is locked. Call it before checking the password, and `succeeded`
        after a right one."""
        self._count(name, address)

    def failed(self, name: str, address: str | None) -> None:
        """Count a failed attempt found out already (a wrong API token); UserError, counting nothing,
        while its pair or its address is locked."""
        self._count(name, address)

    def _count(self, name: str, address: str | None) -> None:
        keys = self.keys(name, address)
        now = utcnow()
        longest = max(limit.lock_seconds for limit in self.limits.values())
        with write_transaction(self.engine) as conn:
            pruned = now - timedelta(seconds=longest)
            conn.execute(delete(SignInFailures).where(SignInFailures.last_failure_at < pruned))
            _insert_missing(conn, sorted(keys.values()))
            rows = {
                key: (failures, last)
                for key, failures, last in conn.execute(
                    select(SignInFailures.key, SignInFailures.failures, SignInFailures.last_failure_at)
                    .where(SignInFailures.key.in_(keys.values()))
                    .order_by(SignInFailures.key)
                    .with_for_update()
                )
            }
            wait, counts, guessed_at = 0.0, {}, False
            for kind, key in keys.items():
                failures, last = rows[key]
                limit = self.limits[kind]
                left = limit.lock_seconds - (now - last).total_seconds()
                if left <= 0:
                    failures = 0  # quiet for a whole lock time: a fresh series
                elif failures >= limit.max_failures:
                    if kind == "name":
                        guessed_at = True  # other addresses' failures: refuses no one (class docstring)
                    else:
                        wait = max(wait, left)
                counts[key] = failures + 1
            if wait > 0:
                raise UserError(f"Too many failed sign-ins; try again in {math.ceil(wait)} s.")
            if guessed_at:  # this address's one try at the name for now; a right password takes it back
                counts[keys["pair"]] = max(counts[keys["pair"]], self.limits["pair"].max_failures)
            for key, failures in counts.items():
                conn.execute(
                    update(SignInFailures)
                    .where(SignInFailures.key == key)
                    .values(failures=failures, last_failure_at=now)
                )

    def succeeded(self, name: str, address: str | None) -> None:
        """The password of this attempt was right: take the attempt back."""
        keys = self.keys(name, address)
        with write_transaction(self.engine) as conn:
            conn.execute(delete(SignInFailures).where(SignInFailures.key == keys["pair"]))
            conn.execute(
                update(SignInFailures)
                .where(SignInFailures.key.in_([keys["address"], keys["name"]]), SignInFailures.failures > 0)
                .values(failures=SignInFailures.failures - 1)
            )


def _insert_missing(conn: Connection, keys: list[str]) -> None:
    """Rows for `keys` that have none, at 0 failures (an insert that skips existing keys, so two
    attempts at once cannot both create the same row)."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    rows = [{"key": key, "failures": 0, "last_failure_at": utcnow()} for key in keys]
    conn.execute(insert(SignInFailures).values(rows).on_conflict_do_nothing(index_elements=["key"]))
