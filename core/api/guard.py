"""What the API refuses before any endpoint runs, whoever is asking.

A browser lets any web page send requests to any address, with the user's own network position:
with AUTH_MODE=none an API on 127.0.0.1 trusts whatever reaches it from the user's machine, the
user's browser included. Such a page can send a POST whose body is text/plain, urlencoded or
multipart without asking the server first (no CORS preflight), and cannot set other content types
without one (which this API never grants). So:

  Origin           a request that names the page it comes from must come from the app's own origin
                   or one of ALLOWED_ORIGINS (core/api/site.py); 403 otherwise. `Sec-Fetch-Site:
                   cross-site` or `same-site`, which browsers add even where they leave Origin out, is
                   refused likewise unless the Origin is one of ALLOWED_ORIGINS.
  Content-Type     a request that changes something (any method but GET and HEAD) must send its body as
                   application/json, or multipart/form-data (images to /predict); 400 otherwise. The
                   body readers (core/api/bodies.py) then insist on the one their endpoint reads.
  query            no NUL character in a query parameter (PostgreSQL's text cannot hold one); 422.

Programs (curl, scripts, the lab's scanner) send no Origin and set their content type, so nothing
here stands in their way. The Host header is checked for the whole server by core/api/site.py.
"""

from __future__ import annotations

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from core.api.errors import ApiError
from core.api.site import origin_allowed, origin_of
from core.config import Settings

SAFE_METHODS = ("GET", "HEAD")
BODY_TYPES = ("application/json", "multipart/form-data")
OTHER_SITE = ("cross-site", "same-site")


def media_type(request: HTTPConnection) -> str:
    """The request's Content-Type without its parameters, lower-case ("" when it has none)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_request(request: HTTPConnection, settings: Settings) -> None:
    """ApiError (403, 400, 422) for a request the API must not act on; see the module docstring."""
    origin = request.headers.get("origin")
    if origin is not None and not origin_allowed(origin, request.scope, settings.allowed_origins):
        raise ApiError(
            403,
            f"This request comes from a web page of another site (Origin: {origin[:100]!r}), "
            "which the API does not answer. Call it from a program (which sends no Origin), or "
            "have an administrator add that origin to ALLOWED_ORIGINS.",
        )
    listed = origin is not None and origin_of(origin) in {origin_of(o) for o in settings.allowed_origins}
    if request.headers.get("sec-fetch-site", "").lower() in OTHER_SITE and not listed:
        raise ApiError(403, "This request comes from a web page of another site, which the API does not answer.")
    if request.scope["method"] not in SAFE_METHODS and media_type(request) not in BODY_TYPES:
        raise ApiError(
            400,
            "Send the request's body as Content-Type: application/json (images to /predict as "
            "multipart/form-data); the API refuses other content types, which any web page could "
            "send in your browser's name.",
        )
    for key, value in request.query_params.multi_items():
        if "\x00" in key or "\x00" in value:
            raise ApiError(
                422,
                f"The query parameter {key.replace(chr(0), '')!r} holds a NUL character, which "
                "no name or value here can have.",
            )


class ApiGuard:
    """ASGI wrapper round the API's router (inside JsonErrors, which answers its refusals as JSON)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            check_request(HTTPConnection(scope), self.settings)
        await self.app(scope, receive, send)
