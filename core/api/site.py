"""Which requests are meant for this server, and the headers every answer carries.

  Host     a browser names the site it thinks it talks to in the Host header. A web page on another
           site whose name is pointed at this machine after it loaded (DNS rebinding) names its own
           host there, so the server answers only the names of ALLOWED_HOSTS (default: localhost,
           127.0.0.1, [::1]) and refuses the rest with 400, pages, websocket and API alike.
  Origin   a browser names the page a request comes from in the Origin header (on every POST, and on
           every cross-origin request). The API takes a request that carries one only from the app's
           own origin (same scheme, host and port as the request) or from ALLOWED_ORIGINS; programs
           send none (core/api/guard.py).
  headers  every answer says that only the app's own pages may frame it (Content-Security-Policy
           frame-ancestors 'self', X-Frame-Options SAMEORIGIN: no other site can lay its page over the
           app's buttons) and that browsers must not guess a content type (X-Content-Type-Options).

`SiteGuard` is the ASGI middleware that serve.py puts in front of the whole server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.config import Settings, load_settings

DEFAULT_PORTS = {"http": 80, "https": 443}
WEB_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
SECURITY_HEADERS = (
    (b"content-security-policy", b"frame-ancestors 'self'"),
    (b"x-frame-options", b"SAMEORIGIN"),
    (b"x-content-type-options", b"nosniff"),
)
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*|[0-9a-f:.]+")  # a DNS name, IPv4 or (unbracketed) IPv6


def split_host(value: str) -> tuple[str, int | None] | None:
    """(name, port or None) of a Host header or an ALLOWED_HOSTS entry, the name lower-case without
    a final dot or IPv6 brackets; None for anything that is not just a host and a port."""
    value = value.strip()
    if value.count(":") > 1 and not value.startswith("["):
        value = f"[{value}]"  # an IPv6 address written without brackets (an ALLOWED_HOSTS entry)
    try:
        parts = urlsplit("//" + value)
        port = parts.port
    except ValueError:  # a port that is not a number, or a broken IPv6 address
        return None
    name = (parts.hostname or "").rstrip(".")
    if parts.username is not None or parts.password is not None or parts.path or parts.query or parts.fragment:
        return None
    return (name, port) if name and _NAME.fullmatch(name) else None


def host_allowed(host: str | None, scheme: str, allowed: Iterable[str]) -> bool:
    """Whether a request's Host header names one of `allowed` (ALLOWED_HOSTS entries: NAME, NAME:PORT,
    *.DOMAIN or *); a port left out of the header is the scheme's own."""
    found = split_host(host) if host else None
    if found is None:
        return False
    name, port = found
    port = port if port is not None else DEFAULT_PORTS.get(WEB_SCHEMES.get(scheme, scheme))
    for entry in allowed:
        if entry == "*":
            return True
        wildcard = entry.startswith("*.")
        pattern = split_host(entry[2:] if wildcard else entry)
        if pattern is None or (pattern[1] is not None and pattern[1] != port):
            continue
        if name.endswith("." + pattern[0]) if wildcard else name == pattern[0]:
            return True
    return False


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a web origin such as https://example.org; None for "null" and the like."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    return scheme, parts.hostname.rstrip("."), port if port is not None else DEFAULT_PORTS[scheme]


def origin_allowed(origin: str, scope: Scope, allowed: Iterable[str]) -> bool:
    """Whether a request's Origin header is the app itself (the scheme of the request and the host and
    port of its Host header) or one of `allowed` (ALLOWED_ORIGINS)."""
    found = origin_of(origin)
    if found is None:
        return False
    if found in {origin_of(entry) for entry in allowed}:
        return True
    scheme = WEB_SCHEMES.get(scope.get("scheme", "http"), "http")
    own = split_host(header(scope, b"host") or "")
    return own is not None and found == (scheme, own[0], own[1] if own[1] is not None else DEFAULT_PORTS[scheme])


def header(scope: Scope, name: bytes) -> str | None:
    """The request's one `name` header; None when it has none or several (which no browser sends)."""
    values = [v for k, v in scope.get("headers", ()) if k.lower() == name]
    return values[0].decode("latin-1") if len(values) == 1 else None


class SiteGuard:
    """ASGI middleware in front of the whole server: requests (websockets included) whose Host is not
    in ALLOWED_HOSTS are refused before anything else sees them, and every HTTP answer gets
    SECURITY_HEADERS (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        self.allowed = (settings or load_settings()).allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not host_allowed(header(scope, b"host"), scope.get("scheme", "http"), self.allowed):
            await self.refuse(scope, send)
            return
        await self.app(scope, receive, self.with_headers(send) if scope["type"] == "http" else send)

    async def refuse(self, scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":  # closed before it is accepted: the server answers 403
            await send({"type": "websocket.close", "code": 1008})
            return
        shown = (header(scope, b"host") or "(none)")[:100]
        body = json.dumps(
            {
                "error": f"This server does not answer to the host name {shown!r}. An administrator "
                "adds the name the app is reached by to ALLOWED_HOSTS."
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *SECURITY_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def with_headers(send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                added = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        return sending
