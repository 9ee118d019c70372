"""Sign-in and roles: password hashes and the accounts file, the sign-in gate of the web app (only
the sign-in for visitors), viewers kept from changing records (pages and core), created_by on
datasets and runs, and the per-user queue limit."""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select
from streamlit.testing.v1 import AppTest

from core.__main__ import main as core_main
from core.access import accounts
from core.access.accounts import EDITOR, VIEWER, User
from core.config import Settings, load_settings
from core.data import uploads
from core.data.datasets import delete_dataset
from core.data.ingest import ingest
from core.errors import UserError
from core.jobs import runs
from core.store.db import Base, Dataset, Run, RunStatus
from core.store.engine import make_engine, make_sessionmaker
from core.training.run_config import RunConfig
from tests.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
TITLE = "Lymphoma subtype recognition"
PASSWORD = "correct horse battery"
TINY = dict(image_size=32, epochs=1, per_class=4, batch_size=4, lr=1e-3, weights="none", device="cpu")
ANA, VIC = User("ana", EDITOR), User("vic", VIEWER)


@pytest.fixture(scope="module")
def password_hash() -> str:
    return accounts.hash_password(PASSWORD)  # hashing is deliberately slow: once for the module


@pytest.fixture
def accounts_file(tmp_path, password_hash) -> Path:
    """ana (editor) and vic (viewer), both with PASSWORD."""
    path = tmp_path / "accounts.toml"
    accounts.write_accounts(
        path,
        accounts.Accounts(
            {
                "ana": accounts.Account("ana", password_hash, EDITOR),
                "vic": accounts.Account("vic", password_hash, VIEWER),
            }
        ),
    )
    return path


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    """Record worker starts instead of spawning one."""
    from core.jobs import worker

    started = []
    monkeypatch.setattr(worker, "ensure_worker", lambda settings: started.append(settings) or True)
    return started


def with_dataset(settings: Settings, tmp_path: Path, name: str = "synthetic", user: User = ANA) -> None:
    write_dataset(tmp_path / f"src-{name}", per_class=3)
    Session = make_sessionmaker(settings.database_url)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / f"src-{name}", name, user=user)


def app(monkeypatch, settings: Settings, mode: str, accounts_path: Path | None = None, **env: str) -> AppTest:
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.setenv("AUTH_MODE", mode)
    if accounts_path is not None:
        monkeypatch.setenv("AUTH_FILE", str(accounts_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return AppTest.from_file(APP, default_timeout=120)


def signed_in_as(at: AppTest, name: str) -> AppTest:
    """Skip the form (tested on its own below): the session holds the user name, as after sign-in."""
    at.session_state["auth_user"] = name
    at.run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    return " ".join(
        [t.value for t in at.title]
        + [h.value for h in at.subheader]
        + [m.value for m in at.markdown]
        + [c.value for c in at.caption]
    )


def only_the_sign_in(at: AppTest) -> None:
    """Nothing of the app: its title and the sign-in, no page, no sidebar (so no worker state)."""
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == [TITLE]
    assert len(at.sidebar) == 0
    assert not at.get("dataframe") and not at.get("metric") and not at.get("plotly_chart")
    assert "Training worker" not in texts(at) and "How it works" not in texts(at)


# ---------------------------------------------------------------------------------------------
# Passwords and the accounts file


def test_hash_round_trip_and_wrong_password_refused(password_hash):
    assert password_hash.startswith("$argon2id$") and PASSWORD not in password_hash
    assert accounts.verify_password(password_hash, PASSWORD)
    assert not accounts.verify_password(password_hash, PASSWORD + "!")
    assert not accounts.verify_password("not a hash", PASSWORD)
    with pytest.raises(UserError, match="at least 8 characters"):
        accounts.hash_password("short")


def test_cli_adds_an_account_to_the_file_atomically_and_never_in_plain_text(tmp_path, monkeypatch, capsys):
    path = tmp_path / "conf" / "accounts.toml"

    def cli(*argv: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return core_main(["accounts", "--file", str(path), *argv])

    assert cli("add", "ana", "--role", "editor", "--password-stdin", stdin=PASSWORD + "\n") == 0
    text = path.read_text()
    assert PASSWORD not in text and "$argon2id$" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["accounts.toml"]  # no temp file left behind
    parsed = accounts.load_accounts(path)
    assert parsed.accounts["ana"].role == EDITOR
    assert accounts.authenticate(parsed, "ana", PASSWORD) == ANA
    assert accounts.authenticate(parsed, "ana", "wrong password") is None
    assert accounts.authenticate(parsed, "nobody", PASSWORD) is None

    # An existing name is not overwritten by accident.
    assert cli("add", "ana", "--role", "viewer", "--password-stdin", stdin="another password\n") == 2
    assert "already exists" in capsys.readouterr().err
    assert accounts.load_accounts(path).accounts["ana"].role == EDITOR
    assert cli("list") == 0 and capsys.readouterr().out == "ana\teditor\n"
    assert cli("remove", "ana") == 0 and not accounts.load_accounts(path).accounts


@pytest.mark.parametrize(
    "text, message",
    [
        ("[accounts.ana\nrole = 1", "not valid TOML"),
        ('[accounts.ana]\npassword_hash = "$argon2id$x"\nrole = "admin"', "role 'admin' is not one of viewer, editor"),
        ('[accounts.ana]\npassword_hash = "hunter22"\nrole = "editor"', "plain-text passwords are not accepted"),
        ('[accounts.ana]\npassword_hash = "$argon2id$x"', "role None"),
        ('[accounts.ana]\npassword = "$argon2id$x"\nrole = "editor"', "unknown key(s) password"),
        ('[account.ana]\npassword_hash = "$argon2id$x"\nrole = "editor"', "unknown section(s) account"),
        ('[accounts."ana smith"]\npassword_hash = "$argon2id$x"\nrole = "editor"', "is not usable"),
        ('[oidc_roles]\n"ana@lab.org" = "owner"', "role 'owner'"),
    ],
)
def test_accounts_file_mistakes_are_user_errors(text, message):
    with pytest.raises(UserError, match="accounts file") as e:
        accounts.parse_accounts(text, "The accounts file x.toml")
    assert message in str(e.value)


def test_a_missing_accounts_file_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="python -m core.access.accounts add NAME --role editor"):
        accounts.load_accounts(tmp_path / "none.toml")
    assert accounts.load_accounts(tmp_path / "none.toml", missing_ok=True).accounts == {}


def test_repeated_wrong_passwords_lock_the_name_for_a_while(accounts_file, Session):
    from core.access.throttle import Limit, SignInThrottle

    parsed = accounts.load_accounts(accounts_file)
    throttle = SignInThrottle(Session, pair=Limit(2, 60))
    for _ in range(2):
        with pytest.raises(UserError, match="Wrong user name or password"):
            accounts.sign_in(parsed, "vic", "guess-guess", throttle)
    with pytest.raises(UserError, match="Too many failed sign-ins"):
        accounts.sign_in(parsed, "vic", PASSWORD, throttle)  # even the right one, until the lock passes
    assert accounts.sign_in(parsed, "ana", PASSWORD, throttle) == ANA  # other names are not affected


def test_oidc_roles_map_addresses_and_refuse_unknown_ones():
    roles = accounts.parse_role_map("Ana@Lab.org=editor, bob@lab.org=viewer")
    assert accounts.oidc_user(roles, "ana@lab.org") == User("ana@lab.org", EDITOR)
    assert accounts.oidc_user(roles, "BOB@lab.org", True) == User("BOB@lab.org", VIEWER)
    assert accounts.oidc_user(roles, "eve@elsewhere.com") is None  # unknown: refused
    assert accounts.oidc_user(roles, "ana@lab.org", email_verified=False) is None
    assert accounts.oidc_user({**roles, "*": VIEWER}, "eve@elsewhere.com") == User("eve@elsewhere.com", VIEWER)
    with pytest.raises(UserError, match="OIDC_ROLES"):
        accounts.parse_role_map("ana@lab.org:editor")


def test_unknown_auth_mode_lets_nobody_in(settings, monkeypatch):
    at = app(monkeypatch, settings, "pasword").run()
    only_the_sign_in(at)
    assert "AUTH\\_MODE is 'pasword'" in at.error[0].value  # escaped Markdown: shown as AUTH_MODE


# ---------------------------------------------------------------------------------------------
# Core: roles and created_by


def test_viewers_cannot_change_records_and_editors_are_recorded(settings, Session, tmp_path):
    write_dataset(tmp_path / "src", per_class=3)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted((tmp_path / "src").rglob("*.tif")):
            zf.write(p, p.relative_to(tmp_path / "src").as_posix())
    with (
        Session.begin() as s,
        pytest.raises(UserError, match="vic is signed in as a viewer: only editors can add images"),
    ):
        ingest(s, settings, tmp_path / "src", "ds", user=VIC)
    with Session.begin() as s, pytest.raises(UserError, match="only editors can add images"):
        uploads.ingest_zip(s, settings, buf.getvalue(), "ds.zip", "ds", user=VIC)
    with Session() as s:
        assert s.scalar(select(Dataset)) is None

    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "ds", user=ANA)
    with Session.begin() as s, pytest.raises(UserError, match="only editors can launch training runs"):
        runs.create_runs(s, settings, RunConfig(dataset="ds", **TINY), user=VIC)
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="ds", **TINY), user=ANA)
        run.status = RunStatus.succeeded  # so deleting is not refused for an active run
    with Session() as s:
        assert s.scalar(select(Dataset.created_by)) == "ana"
        assert s.scalars(select(Run.created_by)).all() == ["ana"]
    with Session.begin() as s, pytest.raises(UserError, match="only editors can delete datasets"):
        delete_dataset(s, settings, "ds", user=VIC)
    with Session.begin() as s:
        delete_dataset(s, settings, "ds", user=ANA)


def test_per_user_queue_limit(settings, Session, tmp_path):
    with_dataset(settings, tmp_path, "ds")
    capped = load_settings({"APP_HOME": str(settings.app_home), "MAX_QUEUED_RUNS_PER_USER": "2"})
    with Session.begin() as s:
        runs.create_runs(s, capped, RunConfig(dataset="ds", **TINY), user=ANA)
        runs.create_runs(s, capped, RunConfig(dataset="ds", **TINY, seed=1), user=ANA)
    with Session.begin() as s, pytest.raises(UserError) as e:
        runs.create_runs(s, capped, RunConfig(dataset="ds", **TINY, seed=2), user=ANA)
    assert "You (ana) already have 2 run(s) queued" in str(e.value) and "MAX_QUEUED_RUNS_PER_USER limit of 2" in str(
        e.value
    )
    with Session.begin() as s:  # someone else still can; so can ana once a run is no longer queued
        runs.create_runs(s, capped, RunConfig(dataset="ds", **TINY, seed=3), user=User("bo", EDITOR))
        s.scalars(select(Run).where(Run.created_by == "ana")).first().status = RunStatus.running
    with Session.begin() as s:
        runs.create_runs(s, capped, RunConfig(dataset="ds", **TINY, seed=4), user=ANA)
    unlimited = load_settings({"APP_HOME": str(settings.app_home), "MAX_QUEUED_RUNS_PER_USER": "0"})
    with Session.begin() as s:
        runs.create_runs(s, unlimited, RunConfig(dataset="ds", **TINY, seed=5), user=ANA)


def test_created_by_is_added_to_an_existing_database(tmp_path):
    path = tmp_path / "old.db"
    made = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(made)  # as a version before migrations made it: no alembic_version
    made.dispose()
    with sqlite3.connect(path) as conn:  # the database as it was before the column existed
        for table in ("datasets", "runs", "augmentation_presets"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN created_by")
    engine = make_engine(f"sqlite:///{path}")
    for table in ("datasets", "runs", "augmentation_presets"):
        column = {c["name"]: c for c in inspect(engine).get_columns(table)}["created_by"]
        assert column["nullable"]
    engine.dispose()


# ---------------------------------------------------------------------------------------------
# The web app's gate


def test_visitors_see_only_the_sign_in(settings, accounts_file, monkeypatch, no_worker, tmp_path):
    with_dataset(settings, tmp_path)
    at = app(monkeypatch, settings, "password", accounts_file).run()
    only_the_sign_in(at)
    assert at.text_input(key="auth_name") and at.text_input(key="auth_password")
    assert not no_worker, "a visitor must not start a worker"
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("pages/dataset.py")  # for a visitor every address shows the sign-in
    # A page file run on its own (without the entry script's gate) draws nothing either.
    page = AppTest.from_file(str(ROOT / "pages" / "dataset.py"), default_timeout=120).run()
    assert not page.exception and not page.title and not page.get("file_uploader") and not page.get("selectbox")


def test_sign_in_with_the_right_password_shows_the_app_and_a_wrong_one_an_error(settings, accounts_file, monkeypatch):
    at = app(monkeypatch, settings, "password", accounts_file).run()
    at.text_input(key="auth_name").input("ana")
    at.text_input(key="auth_password").input("not the password")
    at.button(key="auth_submit").click().run()
    only_the_sign_in(at)
    assert at.error[0].value == "Wrong user name or password."
    assert "auth_user" not in at.session_state
    # The name stays for the second try; the password does not stay anywhere.
    assert at.text_input(key="auth_name").value == "ana" and at.text_input(key="auth_password").value == ""

    at.text_input(key="auth_password").input(PASSWORD)
    at.button(key="auth_submit").click().run()
    assert not at.exception and not at.error
    assert at.title[0].value == TITLE and "How it works" in texts(at)
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "ana" in sidebar and "editor" in sidebar and "Training worker" in sidebar
    assert not any(t.value == PASSWORD for t in at.text_input)  # the form does not keep it

    at.sidebar.button(key="auth_sign_out").click().run()
    only_the_sign_in(at)


def test_a_viewer_sees_no_controls_that_change_records(settings, accounts_file, monkeypatch, tmp_path):
    with_dataset(settings, tmp_path)
    Session = make_sessionmaker(settings.database_url)
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="synthetic", **TINY), user=ANA)
    at = signed_in_as(app(monkeypatch, settings, "password", accounts_file), "vic")
    assert "vic" in " ".join(m.value for m in at.sidebar.markdown)

    at.switch_page("pages/dataset.py").run()
    assert not at.exception and at.title[0].value == "Datasets"
    assert any("by ana" in c.value for c in at.caption)  # who added it
    assert not at.get("file_uploader") and "ds_delete" not in [b.key for b in at.button]
    at.session_state["ds_tab"] = "Add images"
    at.run()
    assert not at.get("file_uploader") and "ds_add" not in [b.key for b in at.button]
    assert any("needs the editor role" in i.value for i in at.info)

    at.switch_page("pages/train.py").run()
    assert not at.exception
    keys = [b.key for b in at.button]
    assert "tr_launch" not in keys and f"tr_cancel_{run.id}" not in keys
    assert any("Launching runs needs the editor role" in i.value for i in at.info)

    at.switch_page("pages/runs.py").run()
    assert not at.exception
    assert f"runs_cancel_{run.id}" not in [b.key for b in at.button]
    assert any("by ana" in c.value for c in at.caption)  # who launched it, under the run's heading

    at.switch_page("pages/augmentation.py").run()
    assert not at.exception
    assert "Save preset" not in [b.label for b in at.button] and "Delete preset" not in [b.label for b in at.button]


def test_an_editor_launches_runs_recorded_under_their_name(settings, accounts_file, monkeypatch, tmp_path):
    with_dataset(settings, tmp_path)
    at = signed_in_as(app(monkeypatch, settings, "password", accounts_file), "ana")
    at.switch_page("pages/train.py").run()
    at.radio(key="tr_weights").set_value("none")
    at.number_input(key="tr_image_size").set_value(32)
    at.number_input(key="tr_per_class").set_value(4)
    at.run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    Session = make_sessionmaker(settings.database_url)
    with Session() as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.created_by == "ana"
    assert f"tr_cancel_{run.id}" in [b.key for b in at.button]  # an editor can cancel


def test_an_account_removed_from_the_file_is_signed_out(settings, accounts_file, monkeypatch):
    at = signed_in_as(app(monkeypatch, settings, "password", accounts_file), "vic")
    assert at.title[0].value == TITLE and len(at.sidebar) > 0
    parsed = accounts.load_accounts(accounts_file)
    del parsed.accounts["vic"]
    accounts.write_accounts(accounts_file, parsed)
    os.utime(accounts_file, ns=(0, 1))  # a new stamp even within the file system's time resolution
    at.run()
    only_the_sign_in(at)


def test_oidc_sign_in_uses_the_role_of_the_address(settings, monkeypatch):
    at = app(monkeypatch, settings, "oidc", OIDC_ROLES="ana@lab.org=editor")
    at.secrets["auth"] = {
        "redirect_uri": "http://localhost:8501/oauth2callback",
        "cookie_secret": "x" * 32,
        "client_id": "id",
        "client_secret": "secret",
        "server_metadata_url": "https://id.example.org/.well-known/openid-configuration",
    }
    at.user = {"is_logged_in": False}
    at.run()
    only_the_sign_in(at)
    assert [b.label for b in at.button] == ["Sign in"] or "Authlib" in at.error[0].value

    at.user = {"is_logged_in": True, "email": "Ana@lab.org", "email_verified": True}
    at.run()
    assert not at.exception and "How it works" in texts(at)
    assert "Ana" in " ".join(m.value for m in at.sidebar.markdown)

    at.user = {"is_logged_in": True, "email": "eve@elsewhere.com"}
    at.run()
    only_the_sign_in(at)
    assert "no role in this app" in at.error[0].value
