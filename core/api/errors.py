"""Every answer of the API that is not a success: JSON `{"error": message}` with its status, never a
traceback. Endpoints raise ApiError; a UserError that reaches the edge is a 422 (the request cannot
be carried out as sent, and the message says why); anything else is logged and answered with 500.

FastAPI's own refusals take the same shape: a parameter it cannot read is a 422 in the parameter's
words (core/api/params.py), except an id in the path past the database's ids, which names nothing
(404, as an address of no route is); its router's 404 and 405 are JSON too. `answer` is the one
mapping from an exception to its answer, used by the endpoints' route class (core/api/routes.py), by
FastAPI's handler for its router's refusals, and by JsonErrors round the whole API."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import UserError

log = logging.getLogger(__name__)

BEARER = {"WWW-Authenticate": 'Bearer realm="api"'}
NOT_FOUND = "No such address in the API; its openapi.json lists the addresses it has."
API_MESSAGE = "api_message"  # a validation error whose message is already in the API's words (params.py)
PATH_IDS = {"run_id": "run", "job_id": "slide job"}  # what an id in the path names


class ApiError(Exception):
    """A refusal with its HTTP status and a message for the client. Not Starlette's HTTPException,
    whose handler inside each route would answer in plain text before JsonErrors sees it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class JsonErrors:
    """ASGI wrapper round the API's router: its own refusals and the router's (405 for a method an
    address does not take) become JSON, and so does an unexpected exception (500, logged)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - the edge: every failure becomes a JSON answer
            if started or scope["type"] != "http":
                raise
            await self.answer(exc)(scope, receive, send)

    @staticmethod
    def answer(exc: Exception) -> JSONResponse:
        if isinstance(exc, ApiError):
            return error_response(exc.status, exc.message, exc.headers)
        if isinstance(exc, RequestValidationError):
            return invalid(exc)
        if isinstance(exc, HTTPException):  # the router's own: 405, or 404 for a path it does not know
            message = exc.detail if isinstance(exc.detail, str) and exc.detail else "Request refused."
            if exc.status_code == 404:
                message = NOT_FOUND
            return error_response(exc.status_code, message, dict(exc.headers or {}))
        if isinstance(exc, UserError):
            return error_response(422, exc.for_api())  # in the API's words where they differ
        log.exception("API request failed")
        return error_response(500, "The server failed to answer this request; its log has the details.")


def invalid(exc: RequestValidationError) -> JSONResponse:
    """A parameter FastAPI could not read: 404 for an id in the path past the database's ids (the
    path's own pattern keeps to 19 digits), 422 otherwise, in the first problem's words."""
    first = exc.errors()[0]
    where, name = (tuple(first.get("loc", ())) + ("request", ""))[:2]
    if where == "path":
        return error_response(404, f"No {PATH_IDS.get(str(name), 'such row')} with id {str(first.get('input'))[:40]}.")
    if first.get("type") == API_MESSAGE:
        return error_response(422, first["msg"])
    return error_response(422, f"The {where} parameter '{name}' cannot be used: {first.get('msg', 'not valid')}.")


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's handler for its router's refusals (404, 405), which happen before any endpoint."""
    return JsonErrors.answer(exc)
