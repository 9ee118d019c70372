"""Entry point, served by serve.py (`streamlit run serve.py`). Lets in only a signed-in user (AUTH_MODE, see
core/access/accounts.py), routes to the pages (which call core/) and draws the shared sidebar: who is
signed in and the background worker's state."""

import importlib.util
from collections.abc import Callable, Mapping
from typing import NoReturn

import streamlit as st

from core.access import accounts, remembered
from core.access.accounts import User
from core.errors import UserError
from core.jobs import manage, views
from pages import _sessions as sessions
from pages._common import (
    SIGNED_IN,
    browser_cookie,
    load_accounts,
    md_text,
    session_factory,
    settings,
    sign_in_throttle,
    sign_out,
    signed_in_user,
    start_worker,
    user_errors,
)

TITLE = "Lymphoma subtype recognition"
st.set_page_config(page_title=TITLE, page_icon="🔬", layout="wide")

pages = {
    "": [st.Page("pages/home.py", title="Home", icon=":material/home:", default=True)],
    "Data": [
        st.Page("pages/dataset.py", title="Datasets", icon=":material/folder_open:", url_path="dataset"),
        st.Page("pages/augmentation.py", title="Augmentation", icon=":material/tune:", url_path="augmentation"),
    ],
    "Model": [
        st.Page("pages/train.py", title="Train", icon=":material/rocket_launch:", url_path="train"),
        st.Page("pages/runs.py", title="Runs", icon=":material/monitoring:", url_path="runs"),
        st.Page("pages/predict.py", title="Predict", icon=":material/biotech:", url_path="predict"),
        st.Page("pages/review.py", title="Review", icon=":material/rate_review:", url_path="review"),
    ],
}
EDITORS_ONLY = {"review"}  # pages listed only for editors (each page refuses a viewer itself too)


# --------------------------------------------------------------------------------------------
# The sign-in gate


def only(draw: Callable[[], None]) -> NoReturn:
    """Show `draw` in place of every page, then stop: no page content, no sidebar, no worker.

    It answers at each page's address (hidden navigation), so a bookmark of /runs shows the sign-in
    rather than "page not found", and after signing in the same address opens the Runs page.
    Without any st.navigation call Streamlit's pages/ folder mode would list the pages' names.
    """

    def sign_in() -> None:
        _, middle, _ = st.columns([1, 2, 1])
        with middle:
            st.title(TITLE)
            draw()

    addresses = [p.url_path for group in pages.values() for p in group if p.url_path]
    st.navigation(
        [st.Page(sign_in, title="Sign in", icon=":material/login:", default=True)]
        + [st.Page(sign_in, title="Sign in", icon=":material/login:", url_path=a) for a in addresses],
        position="hidden",
    ).run()
    st.stop()


def password_form() -> None:
    st.caption("Sign in to continue.")
    with st.form("auth_form"):
        st.text_input("User name", key="auth_name", autocomplete="username")
        st.text_input("Password", type="password", key="auth_password", autocomplete="current-password")
        st.form_submit_button(
            "Sign in", type="primary", icon=":material/login:", key="auth_submit", on_click=try_password
        )
    refused = st.session_state.pop("auth_refused", None)
    if refused:
        st.error(md_text(refused), icon=":material/error:")


def try_password() -> None:
    """The form's callback: sign in, and keep this browser signed in (SIGN_IN_HOURS). Whatever the
    answer, the password leaves the session; the user name stays, so a typo costs only the password."""
    name, password = st.session_state.get("auth_name", ""), st.session_state.get("auth_password", "")
    st.session_state["auth_password"] = ""
    try:
        user = accounts.sign_in(load_accounts(settings()), name, password, sign_in_throttle(), st.context.ip_address)
    except UserError as e:
        st.session_state["auth_refused"] = e.for_page()
        return
    st.session_state[SIGNED_IN] = user.name
    with session_factory().begin() as s:
        remembered.remember(s, browser_cookie(), user.name, settings().sign_in_hours)


def oidc_providers() -> list[str | None]:
    """Providers in secrets.toml: None for a plain [auth] section, NAME for each [auth.NAME]."""
    try:
        if not st.secrets.load_if_toml_exists() or "auth" not in st.secrets:
            return []
        auth = st.secrets["auth"]
    except Exception:  # noqa: BLE001 - a broken secrets file counts as no sign-in configured
        return []
    named = [name for name, value in auth.items() if isinstance(value, Mapping)]
    return ([None] if "client_id" in auth else []) + named


def oidc_form() -> None:
    providers = oidc_providers()
    if not providers:
        st.error(
            "AUTH_MODE is oidc, but .streamlit/secrets.toml has no [auth] section with a provider. "
            "The README's 'Sign-in and roles' section shows one.",
            icon=":material/warning:",
        )
        return
    if st.user.get("is_logged_in"):  # signed in with the provider, but no role here
        email = str(st.user.get("email") or "an account without an e-mail address")
        why = (
            "the provider has not verified that address"
            if st.user.get("email_verified") is False
            else "that address has no role in this app"
        )
        st.error(
            f"You are signed in as {md_text(email)}, but {why}. Ask an administrator to give it a "
            "role (viewer or editor).",
            icon=":material/block:",
        )
        st.button("Sign out", icon=":material/logout:", on_click=st.logout, key="auth_sign_out")
        return
    if importlib.util.find_spec("authlib") is None:
        st.error(
            "Signing in with OIDC needs the Authlib package on the server: `pip install 'Authlib>=1.3.2'`.",
            icon=":material/warning:",
        )
        return
    st.caption("Sign in with your organisation's account to continue.")
    for provider in providers:
        label = "Sign in" if provider is None else f"Sign in with {md_text(provider)}"
        st.button(
            label,
            type="primary",
            icon=":material/login:",
            on_click=st.login,
            args=() if provider is None else (provider,),
            key=f"auth_login_{provider or 'default'}",
        )


def gate() -> User:
    """The signed-in user; anyone else sees only the sign-in (or why nobody can sign in)."""
    try:
        user = signed_in_user()
    except UserError as e:
        sessions.record(None)
        # About the server's own settings (AUTH_MODE, the accounts file), told to whoever opens the
        # page: the accounts file by its name, not by its place on the server.
        message = md_text(views.without_paths(str(e)))
        only(lambda: st.error(message, icon=":material/warning:"))
    # What serve.py's gate goes by: uploads and media files only for signed-in sessions.
    sessions.record(None if user is None else user.name, st.context.cookies.get(sessions.BROWSER_COOKIE))
    if user is None:
        only(oidc_form if settings().auth_mode == "oidc" else password_form)
    return user


def sidebar_user(user: User) -> None:
    if settings().auth_mode == "none":
        return  # one local user: nobody to sign out
    st.markdown(f"**{md_text(user.name)}** :{'violet' if user.can_edit else 'gray'}-badge[{user.role}]")
    if st.button("Sign out", icon=":material/logout:", key="auth_sign_out", width="stretch"):
        sign_out()
    st.divider()


# --------------------------------------------------------------------------------------------
# The app


@st.cache_resource(ttl=30, show_spinner=False)
def _worker_started(database_url: str) -> bool:
    # Once per server process and database, re-checked every 30 s, so `streamlit run` alone is
    # enough and a worker that died is replaced. The URL is the cache key.
    return start_worker(settings())


@st.cache_resource(show_spinner=False)
def local_device() -> str:
    """What a worker on this machine trains on (torch's 'auto' choice), before it reports its own."""
    from core.training.loop import describe_device, pick_device

    return describe_device(pick_device("auto"))


def sidebar_worker(user: User) -> None:
    cfg = settings()
    with user_errors():
        _worker_started(cfg.database_url)
    with session_factory()() as s:
        busy = views.worker_panel(s, cfg).busy
    # Refreshed with the page's own live parts while runs wait or train, so that it never tells
    # another story than the Train page's queue; a run ending redraws the whole page once.
    st.fragment(worker_status, run_every=3 if busy else None)(user, busy)


def worker_status(user: User, was_busy: bool) -> None:
    cfg = settings()
    with session_factory()() as s:
        panel = views.worker_panel(s, cfg)
        notices = views.failure_notices(s, user.name)
    if was_busy and not panel.busy:
        st.rerun(scope="app")  # the last run ended: show its outcome everywhere, and stop polling
    icon = ":material/autorenew:" if panel.running else ":material/schedule:" if panel.alive else ":material/error:"
    colour = "blue" if panel.running else "green" if panel.alive else "red"
    # The tooltip renders Markdown: each line of it as text.
    st.markdown(
        f"**Training worker:** :{colour}-badge[{icon} {panel.state()}]",
        help="  \n".join(md_text(line) for line in panel.details().split("\n\n")),
    )
    if panel.alive or panel.running:
        kind = (
            "GPU"
            if (next((w.device for w in panel.workers if w.device), None) or local_device()).startswith("cuda")
            else "CPU"
        )
        st.caption(
            f"Trains on the {kind}. "
            + (
                f"{panel.queued} run{'s' if panel.queued != 1 else ''} waiting in the queue."
                if panel.queued
                else "Nothing waiting in the queue."
            )
        )
    else:
        st.caption(
            "It starts with the app; reload the page to try again."
            + (f" {panel.queued} run(s) wait for it." if panel.queued else "")
        )
    failure_notices(user, notices)


def failure_notices(user: User, notices: tuple[views.FailureNotice, ...]) -> None:
    """Runs that failed since this user last dismissed them: said once here, on every page."""
    if not notices:
        return
    for n in notices[:3]:
        st.markdown(
            f":red-badge[:material/error: run {n.run_id} failed] "
            f"{views.duration_text(views.seconds_since(n.finished_at))} ago",
            help=md_text(f"{n.title}: {n.message}"),
        )
        st.page_link(
            "pages/runs.py",
            label=f"Open run {n.run_id}",
            icon=":material/monitoring:",
            query_params={"run": str(n.run_id)},
        )
    if len(notices) > 3:
        st.caption(f"…and {len(notices) - 3} more failed run(s): the Runs page lists them.")
    if st.button(
        "Dismiss",
        key="sb_dismiss_failures",
        icon=":material/done_all:",
        help="Hide these notices; the runs stay on the Runs page.",
    ):
        with session_factory().begin() as s:
            manage.mark_failures_seen(s, user.name, max(n.finished_at for n in notices))
        st.rerun(scope="app")


user = gate()
if not user.can_edit or not settings().reviews:
    pages = {group: [p for p in listed if p.url_path not in EDITORS_ONLY] for group, listed in pages.items()}
page = st.navigation(pages)
with st.sidebar:
    sidebar_user(user)
    sidebar_worker(user)
page.run()
