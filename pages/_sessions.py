"""Which browser sessions of this server process are signed in, and as whom, for the server's own routes.

The sign-in gate (streamlit_app.py) records each script run's verdict here; serve.py's gate takes
uploads and serves media files only for sessions recorded as signed in, and counts uploads per person
over all of their sessions. It lives in this process's memory, like the sessions themselves, and
outside Streamlit's caches, which any client may clear.

A session that disconnects is kept by Streamlit for server.disconnectedSessionTTL seconds, to be
resumed, with its uploaded files; past that Streamlit forgets the session but not its files, which
would stay in memory for the life of the process. `release_ended` lets go of them, and until then
they count against their person.
"""

from __future__ import annotations

import threading
import time

from streamlit import config
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

BROWSER_COOKIE = "lymphoma_browser"  # set by serve.py; names the browser that a media request comes from

_lock = threading.Lock()  # script threads write, the server's event loop reads
_signed_in: dict[str, tuple[str, str | None]] = {}  # session id -> (user name, browser cookie)
# Session id -> the user it last signed in as: kept after it signs out or disconnects, until it has
# ended (`release_ended`), since Streamlit may hold its uploads until then.
_owners: dict[str, str] = {}
_gone_since: dict[str, float] = {}  # session id -> when it was first seen disconnected (time.monotonic)


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
            _owners[ctx.session_id] = user_name
        if Runtime.exists():
            runtime = Runtime.instance()
            for session_id in [s for s in _signed_in if not runtime.is_active_session(s)]:
                del _signed_in[session_id]
    release_ended()


def is_signed_in(session_id: str) -> bool:
    with _lock:
        return session_id in _signed_in


def browser_signed_in(browser: str) -> bool:
    """True if a session signed in from the browser with this cookie is still connected."""
    runtime = Runtime.instance()
    with _lock:
        return any(b == browser and runtime.is_active_session(s) for s, (_, b) in _signed_in.items())


def person_sessions(session_id: str) -> list[str]:
    """The sessions of the person who signed in to `session_id`, itself included: open ones, and
    closed ones that have not ended yet (their uploads may still be held)."""
    with _lock:
        person = _owners.get(session_id)
        return [s for s, p in _owners.items() if p == person] if person is not None else [session_id]


def release_ended() -> None:
    """Remove the uploaded files of the sessions that have ended: disconnected for longer than
    Streamlit keeps a session to be resumed (server.disconnectedSessionTTL), and forget them."""
    if not Runtime.exists():
        return
    runtime = Runtime.instance()
    ttl, now = float(config.get_option("server.disconnectedSessionTTL")), time.monotonic()
    ended = []
    with _lock:
        for session_id in list(_owners):
            if runtime.is_active_session(session_id):
                _gone_since.pop(session_id, None)
            elif now - _gone_since.setdefault(session_id, now) > ttl:
                ended.append(session_id)
                del _owners[session_id], _gone_since[session_id]
    for session_id in ended:
        runtime.uploaded_file_mgr.remove_session_files(session_id)
