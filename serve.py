"""The web server: `streamlit run serve.py` (what `make run` does) serves streamlit_app.py behind
a gate on two of Streamlit's own routes, which do not pass through the app's sign-in.

  uploads  Streamlit takes a file for any connected browser session, signed in or not, and holds
           it in memory until the session ends. Here only a session that the sign-in gate
           recorded as signed in (pages/_sessions.py) may upload (403 otherwise), with at most
           MAX_SESSION_UPLOAD_MB held or arriving at once (413), and MAX_USER_UPLOAD_MB for all the
           sessions of one person together, its Content-Length declared (411);
           a refused upload is answered before any of its body is read.
  media    thumbnails and downloads (/media/...) are served only to a browser that has a signed-in
           session open: it carries the cookie that this gate set on its first page load, and the
           session recorded it. A media address on its own, copied elsewhere, shows nothing.

The HTTP API (core/api, /api/v1 under server.baseUrlPath) is served beside the pages on the same
port. The gate lets it through untouched: the API asks for its own bearer tokens, not for a signed-in
browser session, and its answers carry no browser cookie.

In front of the gate, SiteGuard (core/api/site.py) refuses every request, websocket included, whose
Host header is not in ALLOWED_HOSTS (400: a DNS-rebinding page cannot reach the pages or the API), and
gives every answer the headers that keep other sites from framing the app.
"""

from __future__ import annotations

import re
import secrets
import sys

import streamlit as st
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from streamlit import config
from streamlit.runtime import Runtime

from core.access.bind import check_listen_address
from core.api.routes import API_PREFIX, api_routes
from core.api.site import SiteGuard
from core.config import load_settings
from core.errors import UserError
from pages._sessions import BROWSER_COOKIE, browser_signed_in, is_signed_in, person_sessions, release_ended


class Gate:
    """ASGI middleware in front of Streamlit's routes; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        prefix = base_path()
        self.api = prefix + API_PREFIX + "/"
        self.upload = re.compile(re.escape(prefix) + r"/_stcore/upload_file/([^/]+)/[^/]+")
        self.media = prefix + "/media/"
        self.cookie_path = prefix or "/"
        self.max_bytes = load_settings().max_session_upload_mb * 1024 * 1024  # 0: no limit
        self.max_person_bytes = load_settings().max_user_upload_mb * 1024 * 1024  # 0: no limit
        self.arriving: dict[str, int] = {}  # session id -> bytes of its uploads under way

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Every path under the API's prefix is the API's own (its Mount comes first and takes them all),
        # so passing them untouched opens none of Streamlit's routes.
        if scope["type"] != "http" or scope["path"].startswith(self.api):
            await self.app(scope, receive, send)
            return
        request = HTTPConnection(scope)
        browser = request.cookies.get(BROWSER_COOKIE)
        if scope["path"].startswith(self.media) and not (browser and browser_signed_in(browser)):
            await PlainTextResponse("Sign in to see this file.", status_code=403)(scope, receive, send)
            return
        upload = self.upload.fullmatch(scope["path"]) if scope["method"] == "PUT" else None
        if upload is not None:
            await self.guarded_upload(upload[1], request, receive, send)
            return
        await self.app(
            scope, receive, send if browser else self.with_cookie(send, secure=scope.get("scheme") == "https")
        )

    async def guarded_upload(self, session_id: str, request: HTTPConnection, receive: Receive, send: Send) -> None:
        """Pass the upload on if its session is signed in and stays within its total."""
        try:
            size = int(request.headers["content-length"])
        except (KeyError, ValueError):
            size = -1
        if not is_signed_in(session_id):
            refusal = PlainTextResponse("Sign in to upload files.", status_code=403)
        elif size < 0:
            refusal = PlainTextResponse("An upload must declare its Content-Length.", status_code=411)
        elif self.max_bytes and self.held(session_id) + self.arriving.get(session_id, 0) + size > self.max_bytes:
            refusal = PlainTextResponse(
                f"This session's uploads would pass MAX_SESSION_UPLOAD_MB "
                f"({self.max_bytes / 2**20:g} MB); remove some first.",
                status_code=413,
            )
        elif self.max_person_bytes and self.held_by_person(session_id) + size > self.max_person_bytes:
            refusal = PlainTextResponse(
                f"Your uploads in all your sessions would pass MAX_USER_UPLOAD_MB "
                f"({self.max_person_bytes / 2**20:g} MB); remove some, or close other "
                "tabs, first.",
                status_code=413,
            )
        else:
            refusal = None
        if refusal is not None:
            await refusal(request.scope, receive, send)
            return
        # Counted from here, in the event loop's one thread, so uploads sent at once add up.
        self.arriving[session_id] = self.arriving.get(session_id, 0) + size
        try:
            await self.app(request.scope, receive, send)
        finally:
            self.arriving[session_id] -= size
            if not self.arriving[session_id]:
                del self.arriving[session_id]

    @staticmethod
    def held(session_id: str) -> int:
        """Bytes of the files Streamlit holds for the session (its in-memory manager's own record;
        list() copies it in one step, as other threads may add or remove files meanwhile)."""
        files = Runtime.instance().uploaded_file_mgr.file_storage.get(session_id, {})
        return sum(len(f.data) for f in list(files.values()))

    def held_by_person(self, session_id: str) -> int:
        """Bytes held or arriving for every session of the person signed in to `session_id`, closed
        ones whose files Streamlit still holds included (those of ended sessions are let go first)."""
        release_ended()
        return sum(self.held(s) + self.arriving.get(s, 0) for s in person_sessions(session_id))

    def with_cookie(self, send: Send, secure: bool = False) -> Send:
        """`send` that gives a browser without the cookie a new one (HttpOnly: no script reads it; over
        https, Secure: never sent in the clear). It also names the browser a sign-in is kept for
        (core/access/remembered.py)."""

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                cookie = (
                    f"{BROWSER_COOKIE}={secrets.token_urlsafe(24)}; Path={self.cookie_path}; HttpOnly; "
                    "SameSite=Lax" + ("; Secure" if secure else "")
                )
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return sending


def base_path() -> str:
    """server.baseUrlPath as a path prefix: "" or "/name"."""
    base = (config.get_option("server.baseUrlPath") or "").strip("/")
    return f"/{base}" if base else ""


def refuse_unsafe_address() -> None:
    """Stop before serving a request when no sign-in would guard an address others can reach.
    Streamlit has bound the socket by now (it imports this file after), but nothing is served yet."""
    try:
        check_listen_address(load_settings().auth_mode, config.get_option("server.address"))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


refuse_unsafe_address()
# The Host check first, so that its refusals reach nothing else; its headers go on the gate's answers too.
MIDDLEWARE = [Middleware(SiteGuard), Middleware(Gate)]
app = st.App("streamlit_app.py", routes=api_routes(prefix=base_path() + API_PREFIX), middleware=MIDDLEWARE)
