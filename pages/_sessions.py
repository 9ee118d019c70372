"""Which browser sessions of this server process are signed in, for the server's own routes.

The sign-in gate (streamlit_app.py) records each script run's verdict here; serve.py's gate takes
uploads and serves media files only for sessions recorded as signed in. It lives in this process's
memory, like the sessions themselves, and outside Streamlit's caches, which any client may clear.
"""

from __future__ import annotations

import threading

from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

BROWSER_COOKIE = "lymphoma_browser"  # set by serve.py; names the browser that a media request comes from

_lock = threading.Lock()  # script threads write, the server's event loop reads
_signed_in: dict[str, tuple[str, str | None]] = {}  # session id -> (user name, browser cookie)


def record(user_name: str | None, browser: str | None = None) -> None:
    """The session of this script run is signed in as `user_name` (None: nobody) in `browser`.
    Sessions that have ended since are forgotten at the same time."""
    ctx = get_script_run_ctx()
    if ctx is None:
        return
    with _lock:
        if user_name is None:
            _signed_in.pop(ctx.session_id, None)
        else:
            _signed_in[ctx.session_id] = (user_name, browser)
        if Runtime.exists():
            runtime = Runtime.instance()
            for session_id in [s for s in _signed_in if not runtime.is_active_session(s)]:
                del _signed_in[session_id]


def is_signed_in(session_id: str) -> bool:
    with _lock:
        return session_id in _signed_in


def browser_signed_in(browser: str) -> bool:
    """True if a session signed in from the browser with this cookie is still connected."""
    runtime = Runtime.instance()
    with _lock:
        return any(b == browser and runtime.is_active_session(s) for s, (_, b) in _signed_in.items())
