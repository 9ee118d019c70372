"""Reading request bodies within limits: images in a multipart form (MAX_UPLOAD_MB, as the pages'
uploads together) and JSON objects (JSON_LIMIT). A body declared too large is refused (413) before
any of it is read; one that does not declare its size, or declares less than it sends, is counted as
it arrives and refused the moment it passes the limit."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive

from core.access.limits import MB
from core.api.errors import ApiError
from core.config import Settings
from core.inference.service import ImageInput

JSON_LIMIT = 1 * MB  # a run's settings are a few hundred bytes
IMAGES_FIELD = "images"
MAX_FILES = 1000  # images in one request


class _TooLarge(Exception):
    pass


def upload_limit(settings: Settings) -> int | None:
    """Bytes one request may carry: MAX_UPLOAD_MB (None: no limit)."""
    return int(settings.max_upload_mb * MB) if settings.max_upload_mb > 0 else None


def _too_large(limit: int, what: str, size: int | None = None) -> ApiError:
    told = f"is {size / MB:,.1f} MB, " if size is not None else "passed "
    return ApiError(413, f"The request {told}more than the {what} of {limit / MB:g} MB. Send it in smaller parts.")


def check_declared(request: Request, limit: int | None, what: str) -> None:
    """413 when the request's Content-Length is over `limit`, before any of the body is read."""
    try:
        size = int(request.headers.get("content-length", ""))
    except ValueError:
        return
    if limit is not None and size > limit:
        raise _too_large(limit, what, size)


def _counting(receive: Receive, limit: int | None) -> Receive:
    """`receive` that raises _TooLarge once the body's bytes pass `limit`."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if limit is not None and seen > limit:
                raise _TooLarge
        return message

    return counted


async def read_images(request: Request, settings: Settings) -> tuple[list[ImageInput], str | None]:
    """The files under the form field `images`, and the form's `run` field (None when absent)."""
    limit = upload_limit(settings)
    check_declared(request, limit, "MAX_UPLOAD_MB limit")
    counted = Request(request.scope, _counting(request.receive, limit))
    try:
        async with counted.form(max_files=MAX_FILES) as form:
            files = form.getlist(IMAGES_FIELD)
            run = form.get("run")
            if any(not isinstance(f, UploadFile) for f in files) or isinstance(run, UploadFile):
                raise ApiError(422, f"'{IMAGES_FIELD}' must be files and 'run' a run id.")
            images = [ImageInput(f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(files)]
    except _TooLarge:
        raise _too_large(limit or 0, "MAX_UPLOAD_MB limit") from None
    except HTTPException as e:  # a malformed multipart body, in Starlette's words
        raise ApiError(400, f"The form cannot be read: {e.detail}") from None
    if not images:
        raise ApiError(422, f"Send one or more images as multipart/form-data, each under the field "
                            f"'{IMAGES_FIELD}'.")
    return images, run


async def read_json(request: Request) -> Any:
    """The JSON body; 413 past JSON_LIMIT, 422 when it is not JSON."""
    check_declared(request, JSON_LIMIT, "limit for a JSON body")
    counted = Request(request.scope, _counting(request.receive, JSON_LIMIT))
    try:
        body = await counted.body()
    except _TooLarge:
        raise _too_large(JSON_LIMIT, "limit for a JSON body") from None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(422, f"The body is not JSON: {e}.") from None
