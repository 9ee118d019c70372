"""The sign-in throttle: failed sign-ins counted in the database, checked and counted in one step,
by name and by client address, and out of reach of Streamlit's cache clearing (checked against a
real server through its websocket)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, select, update

from core.access import accounts
from core.access.throttle import Limit, SignInThrottle
from core.errors import UserError
from core.store.db import SignInFailures
from core.store.engine import make_sessionmaker
from tests.server import ROOT, ProtocolClient, free_port, start_app, stop_app, wait_healthy

PASSWORD = "correct horse battery"
LOCKED = "Too many failed sign-ins; try again in"


@pytest.fixture(scope="module")
def ana() -> accounts.Accounts:
    # Cheap argon2 costs (the hash carries them), so that the many sign-ins here take no time.
    hashed = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
    return accounts.Accounts(
        {
            "ana": accounts.Account("ana", hashed, accounts.EDITOR),
            "vic": accounts.Account("vic", hashed, accounts.VIEWER),
        }
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, settings) -> str:
    return settings.database_url if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def refused(parsed: accounts.Accounts, throttle: SignInThrottle, name: str, password: str, address: str) -> str:
    """The message of a sign-in that fails."""
    with pytest.raises(UserError) as e:
        accounts.sign_in(parsed, name, password, throttle, address)
    return str(e.value)


def age_counters(Session, seconds: float) -> None:
    """As if `seconds` had passed since every recorded failure."""
    with Session.begin() as s:
        earlier = SignInFailures.last_failure_at - timedelta(seconds=seconds)
        s.execute(update(SignInFailures).values(last_failure_at=earlier))


# ---------------------------------------------------------------------------------------------
# The throttle itself


def test_wrong_guesses_sent_at_once_check_no_more_passwords_than_the_limit(ana, database_url, monkeypatch):
    checked = []
    verify = accounts.verify_password

    def counted(password_hash: str, password: str) -> bool:
        checked.append(password)
        time.sleep(0.05)  # as long as a check with the real costs takes
        return verify(password_hash, password)

    monkeypatch.setattr(accounts, "verify_password", counted)
    throttle = SignInThrottle(make_sessionmaker(database_url), pair=Limit(5, 60))
    start, messages = threading.Barrier(12), []

    def guess(i: int) -> None:
        start.wait()
        messages.append(refused(ana, throttle, "ana", f"guess-{i:04d}", "10.0.0.1"))

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(checked) == 5, f"{len(checked)} passwords checked"
    assert sorted(m.startswith(LOCKED) for m in messages) == [False] * 5 + [True] * 7
    assert refused(ana, throttle, "ana", PASSWORD, "10.0.0.1").startswith(LOCKED)  # even the right one
    assert len(checked) == 5


def test_the_lock_outlives_the_throttle_and_the_process(ana, settings):
    throttle = SignInThrottle(make_sessionmaker(settings.database_url))
    for _ in range(5):
        refused(ana, throttle, "ana", "guess-guess", "10.0.0.1")
    code = (
        "import sys; from core.store.engine import make_sessionmaker; from core.access.throttle import SignInThrottle\n"
        "from core.errors import UserError\n"
        "try:\n    SignInThrottle(make_sessionmaker(sys.argv[1])).attempt('ana', '10.0.0.1')\n"
        "except UserError as e:\n    print(e)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, settings.database_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.startswith(LOCKED), out


def test_failures_from_one_address_do_not_lock_the_name_for_another(ana, Session):
    throttle = SignInThrottle(Session, pair=Limit(3, 60), address=Limit(6, 300), name=Limit(9, 300))
    for _ in range(3):
        assert refused(ana, throttle, "ana", "guess-guess", "10.0.0.1") == "Wrong user name or password."
    assert refused(ana, throttle, "ana", PASSWORD, "10.0.0.1").startswith(LOCKED)
    assert accounts.sign_in(ana, "ana", PASSWORD, throttle, "10.0.0.2").name == "ana"  # her own machine
    # An address that fails with many names is locked for all of them.
    for name in ("vic", "vic", "nobody"):
        refused(ana, throttle, name, "guess-guess", "10.0.0.1")
    assert refused(ana, throttle, "vic", PASSWORD, "10.0.0.1").startswith(LOCKED)
    assert accounts.sign_in(ana, "vic", PASSWORD, throttle, "10.0.0.2").name == "vic"


def test_guesses_from_many_addresses_never_lock_out_the_right_password_and_stay_slow(ana, Session, monkeypatch):
    throttle = SignInThrottle(Session, pair=Limit(3, 60), address=Limit(6, 300), name=Limit(9, 300))
    # Guesses at vic's name spread over ten addresses, past the limit of the name.
    for i in range(10):
        assert refused(ana, throttle, "vic", "guess-guess", f"10.0.1.{i}") == "Wrong user name or password."
    assert accounts.sign_in(ana, "vic", PASSWORD, throttle, "10.0.0.2").name == "vic"  # vic, from her own machine
    # While the name is guessed at, each address has one try at it per pair lock: a wrong one locks the
    # pair at once, and guesses sent at once from a new address check one password.
    assert refused(ana, throttle, "vic", "guess-guess", "10.0.2.1") == "Wrong user name or password."
    assert refused(ana, throttle, "vic", PASSWORD, "10.0.2.1").startswith(LOCKED)
    checked = []
    verify = accounts.verify_password
    monkeypatch.setattr(accounts, "verify_password", lambda h, p: checked.append(p) or verify(h, p))
    start = threading.Barrier(8)

    def guess(i: int) -> None:
        start.wait()
        refused(ana, throttle, "vic", f"guess-{i}", "10.0.3.1")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(checked) == 1
    age_counters(Session, 61)  # the pair's lock passes; the name's count has not
    assert accounts.sign_in(ana, "vic", PASSWORD, throttle, "10.0.2.1").name == "vic"


def test_a_right_password_takes_its_attempt_back_and_locks_pass(ana, Session):
    throttle = SignInThrottle(Session, pair=Limit(3, 60), address=Limit(10, 300))
    for _ in range(2):
        refused(ana, throttle, "ana", "guess-guess", "10.0.0.1")
    assert accounts.sign_in(ana, "ana", PASSWORD, throttle, "10.0.0.1").name == "ana"
    with Session() as s:
        counts = dict(s.execute(select(SignInFailures.key, SignInFailures.failures)).all())
    # The pair starts again; the address and the name keep the two wrong guesses.
    assert counts == {"address 10.0.0.1": 2, "name ana": 2}
    for _ in range(3):
        refused(ana, throttle, "ana", "guess-guess", "10.0.0.1")
    message = refused(ana, throttle, "ana", PASSWORD, "10.0.0.1")
    assert message.startswith(LOCKED) and message.endswith(" s.") and "ana" not in message
    age_counters(Session, 61)
    assert accounts.sign_in(ana, "ana", PASSWORD, throttle, "10.0.0.1").name == "ana"


def test_old_counters_are_pruned(ana, Session):
    throttle = SignInThrottle(Session)
    for i in range(20):
        throttle.attempt(f"someone{i}", f"10.0.2.{i}")
    age_counters(Session, 301)
    refused(ana, throttle, "ana", "guess-guess", "10.0.0.1")
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(SignInFailures)) == 3  # the last attempt's


# ---------------------------------------------------------------------------------------------
# A real server, spoken to through its websocket as any client may


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("throttle-server")
    accounts.add_account(home / "accounts.toml", "ana", PASSWORD, accounts.EDITOR)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS")}
    env.update(APP_HOME=str(home), AUTH_MODE="password", AUTH_FILE=str(home / "accounts.toml"), START_WORKER="0")
    port = free_port()
    with open(home / "streamlit.log", "wb") as log:
        process = start_app(port, env, log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process, log=home / "streamlit.log")
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_app(process)


def sign_in_over_websocket(url: str, name: str, password: str) -> list[str]:
    """A new session fills in and submits the sign-in form; the alerts and buttons drawn after."""
    from streamlit.proto.WidgetStates_pb2 import WidgetState

    client = ProtocolClient(url)
    try:
        form = client.rerun()
        inputs = {e.text_input.label: e.text_input.id for e in form if e.WhichOneof("type") == "text_input"}
        submit = next(e.button.id for e in form if e.WhichOneof("type") == "button" and e.button.is_form_submitter)
        page = client.rerun(
            WidgetState(id=inputs["User name"], string_value=name),
            WidgetState(id=inputs["Password"], string_value=password),
            WidgetState(id=submit, trigger_value=True),
        )
    finally:
        client.close()
    return [e.alert.body.replace("\\", "") for e in page if e.WhichOneof("type") == "alert"] + [
        e.button.label for e in page if e.WhichOneof("type") == "button"
    ]


def test_clearing_the_servers_caches_does_not_unlock_a_name(server):
    from streamlit.proto.BackMsg_pb2 import BackMsg

    for _ in range(5):
        assert "Wrong user name or password." in sign_in_over_websocket(server, "ana", "guess-guess")
    assert any(t.startswith(LOCKED) for t in sign_in_over_websocket(server, "ana", PASSWORD))
    client = ProtocolClient(server)  # a visitor who never signed in asks the server to clear its caches
    client.rerun()
    client.send(BackMsg(clear_cache=True))
    client.rerun()  # answered after the clearing: messages of a session are handled in order
    client.close()
    after = sign_in_over_websocket(server, "ana", PASSWORD)
    assert any(t.startswith(LOCKED) for t in after) and "Sign out" not in after, after
