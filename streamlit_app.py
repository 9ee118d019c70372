"""Entry point, served by serve.py (`streamlit run serve.py`). Lets in only a signed-in user (AUTH_MODE, see
core/access/accounts.py), routes to the pages (which call core/) and draws the shared sidebar: who is
signed in and the background worker's state."""

import importlib.util
from collections.abc import Callable, Mapping
from typing import NoReturn

import streamlit as st

from core.access import accounts
from core.access.accounts import User
from core.errors import UserError
from core.jobs import views
from pages import _sessions as sessions
from pages._common import (
    SIGNED_IN, load_accounts, md_text, session_factory, settings, sign_in_throttle, sign_out, signed_in_user,
    start_worker, user_errors,
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
    ],
}


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
    st.navigation([st.Page(sign_in, title="Sign in", icon=":material/login:", default=True)]
                  + [st.Page(sign_in, title="Sign in", icon=":material/login:", url_path=a) for a in addresses],
                  position="hidden").run()
    st.stop()


def password_form() -> None:
    st.caption("Sign in to continue.")
    # clear_on_submit: the password does not stay in the session after this run.
    with st.form("auth_form", clear_on_submit=True):
        name = st.text_input("User name", key="auth_name", autocomplete="username")
        password = st.text_input("Password", type="password", key="auth_password", autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary", icon=":material/login:", key="auth_submit")
    if submitted:
        with user_errors():
            user = accounts.sign_in(load_accounts(settings()), name, password, sign_in_throttle(),
                                    st.context.ip_address)
            st.session_state[SIGNED_IN] = user.name
            st.rerun()


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
        st.error("AUTH_MODE is oidc, but .streamlit/secrets.toml has no [auth] section with a provider. "
                 "The README's 'Sign-in and roles' section shows one.", icon=":material/warning:")
        return
    if st.user.get("is_logged_in"):  # signed in with the provider, but no role here
        email = str(st.user.get("email") or "an account without an e-mail address")
        why = ("the provider has not verified that address" if st.user.get("email_verified") is False
               else "that address has no role in this app")
        st.error(f"You are signed in as {md_text(email)}, but {why}. Ask an administrator to give it a "
                 "role (viewer or editor).", icon=":material/block:")
        st.button("Sign out", icon=":material/logout:", on_click=st.logout, key="auth_sign_out")
        return
    if importlib.util.find_spec("authlib") is None:
        st.error("Signing in with OIDC needs the Authlib package on the server: "
                 "`pip install 'Authlib>=1.3.2'`.", icon=":material/warning:")
        return
    st.caption("Sign in with your organisation's account to continue.")
    for provider in providers:
        label = "Sign in" if provider is None else f"Sign in with {md_text(provider)}"
        st.button(label, type="primary", icon=":material/login:", on_click=st.login,
                  args=() if provider is None else (provider,), key=f"auth_login_{provider or 'default'}")


def gate() -> User:
    """The signed-in user; anyone else sees only the sign-in (or why nobody can sign in)."""
    try:
        user = signed_in_user()
    except UserError as e:
        sessions.record(None)
        message = str(e)  # about the server's own settings (AUTH_MODE, the accounts file)
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


def sidebar_worker() -> None:
    cfg = settings()
    with user_errors():
        _worker_started(cfg.database_url)
    with session_factory()() as s:
        panel = views.worker_panel(s, cfg)
    st.markdown("**Background worker**")
    if panel.alive:
        for w in panel.workers:
            device = w.device or local_device()  # known once it has trained a run
            kind = "GPU" if device.startswith("cuda") else "CPU"
            doing = "training " + ", ".join(f"run {r}" for r in w.running) if w.running else "idle"
            st.markdown(f":green-badge[:material/memory: {kind}] {doing}")
            st.caption(f"{device} · heartbeat {w.heartbeat_age:.0f} s ago")
    else:
        st.markdown(":red-badge[:material/error: not running]")
        st.caption("It starts with the app; reload the page to try again.")
    st.caption(f"{panel.queued} run(s) queued" if panel.queued else "Queue empty")


user = gate()
page = st.navigation(pages)
with st.sidebar:
    sidebar_user(user)
    sidebar_worker()
page.run()
