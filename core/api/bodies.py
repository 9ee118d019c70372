"""Reading request bodies within limits: images in a multipart form (MAX_UPLOAD_MB, as the pages'
uploads together) and JSON objects (JSON_LIMIT). A body declared too large is refused (413) before
any of it is read; one that does not declare its size, or declares less than it sends, is counted as
it arrives and refused the moment it passes the limit.

Each reader takes only its own content type (400 otherwise; core/api/guard.py says why). JSON may
nest at most JSON_DEPTH levels of arrays and objects, and no string in it, nor a file name or field
of a form, may hold a NUL character (PostgreSQL's text cannot): each a 422 rather than a failure
further in. Numbers are checked where they are used: RunConfig.validate refuses a non-finite one
(NaN, Infinity, 1e400) by the name of its setting."""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive

from core.access.limits import MB
from core.api.errors import ApiError
from core.api.guard import media_type
from core.config import Settings
from core.inference.service import ImageInput

JSON_LIMIT = 1 * MB  # a run's settings are a few hundred bytes
JSON_DEPTH = 32  # levels of nested arrays and objects; a run's settings have two
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
    if media_type(request) != "multipart/form-data":
        raise ApiError(
            400, f"Send the images as Content-Type: multipart/form-data, each under the field '{IMAGES_FIELD}'."
        )
    limit = upload_limit(settings)
    check_declared(request, limit, "MAX_UPLOAD_MB limit")
    counted = Request(request.scope, _counting(request.receive, limit))
    try:
        async with counted.form(max_files=MAX_FILES) as form:
            files = form.getlist(IMAGES_FIELD)
            run = form.get("run")
            if any(not isinstance(f, UploadFile) for f in files) or isinstance(run, UploadFile):
                raise ApiError(422, f"'{IMAGES_FIELD}' must be files and 'run' a run id.")
            for text in [run or "", *(f.filename or "" for f in files)]:
                _check_text(text, "A file name or the 'run' field")
            images = [ImageInput(f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(files)]
    except _TooLarge:
        raise _too_large(limit or 0, "MAX_UPLOAD_MB limit") from None
    except HTTPException as e:  # a malformed multipart body, in Starlette's words
        raise ApiError(400, f"The form cannot be read: {e.detail}") from None
    if not images:
        raise ApiError(422, f"Send one or more images as multipart/form-data, each under the field '{IMAGES_FIELD}'.")
    return images, run


async def read_json(request: Request) -> Any:
    """The JSON body; 400 unless sent as application/json, 413 past JSON_LIMIT, 422 when it is not
    strict JSON within JSON_DEPTH levels or holds a NUL character."""
    if media_type(request) != "application/json":
        raise ApiError(400, "Send the body as Content-Type: application/json.")
    check_declared(request, JSON_LIMIT, "limit for a JSON body")
    counted = Request(request.scope, _counting(request.receive, JSON_LIMIT))
    try:
        body = await counted.body()
    except _TooLarge:
        raise _too_large(JSON_LIMIT, "limit for a JSON body") from None
    return await run_in_threadpool(parse_json, body)  # a megabyte of items takes a while to walk


def parse_json(body: bytes) -> Any:
    """`body` as JSON within the limits of the module docstring; ApiError 422 otherwise."""
    try:
        value = json.loads(body)
    except RecursionError:  # deeper than the parser goes, long before JSON_LIMIT
        raise ApiError(422, f"The body nests arrays or objects more than {JSON_DEPTH} levels deep.") from None
    except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits (int()'s limit)
        raise ApiError(422, f"The body is not JSON: {str(e)[:200]}.") from None
    _check_nesting(value)
    return value


def _check_nesting(value: Any) -> None:
    """422 when `value` nests deeper than JSON_DEPTH or a string in it (a key too) holds a NUL,
    naming the key it is under. Walked with a list, not recursion, so no depth exhausts the stack."""
    pending: list[tuple[Any, int, str]] = [(value, 1, "")]
    while pending:
        item, depth, key = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > JSON_DEPTH:
                raise ApiError(422, f"The body nests arrays or objects more than {JSON_DEPTH} levels deep.")
            if isinstance(item, dict):  # its keys and its values, each under its key
                pending.extend((child, depth + 1, str(k)) for k, v in item.items() for child in (k, v))
            else:
                pending.extend((child, depth + 1, key) for child in item)
        elif isinstance(item, str):
            _check_text(item, f"The value of {key!r}" if key else "A string of the body")


def _check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise ApiError(
            422,
            f"{what} holds a NUL character ({text.replace(chr(0), '?')[:60]!r}); no name or value here can have one.",
        )


SLIDE_FIELD = "slide"


async def read_slide(request: Request, settings: Settings) -> tuple[UploadFile | None, dict[str, str]]:
    """A slide to classify: as multipart/form-data, the file under `slide` with the fields `run` and
    `mpp`; or as JSON, {"path": a slide under IMPORT_ROOTS, "run": ..., "mpp": ...}. (the upload, or
    None for a path; the text fields). The upload lies in a temporary file the form removes when the
    request ends, so the caller copies it before then."""
    if media_type(request) == "application/json":
        data = await read_json(request)
        if not isinstance(data, dict) or not isinstance(data.get("path"), str):
            raise ApiError(
                422,
                'Send {"path": the slide\'s path on the server, "run": ..., "mpp": ...} as JSON, '
                f"or the slide's file as multipart/form-data under the field '{SLIDE_FIELD}'.",
            )
        return None, {k: str(data[k]) for k in ("path", "run", "mpp") if data.get(k) is not None}
    if media_type(request) != "multipart/form-data":
        raise ApiError(
            400,
            f"Send the slide as multipart/form-data under the field '{SLIDE_FIELD}', or its path on "
            "the server as JSON.",
        )
    limit = upload_limit(settings)
    check_declared(request, limit, "MAX_UPLOAD_MB limit")
    counted = Request(request.scope, _counting(request.receive, limit))
    try:
        form = await counted.form(max_files=1)
    except _TooLarge:
        raise _too_large(limit or 0, "MAX_UPLOAD_MB limit") from None
    except HTTPException as e:
        raise ApiError(400, f"The form cannot be read: {e.detail}") from None
    slide = form.get(SLIDE_FIELD)
    fields = {k: form.get(k) for k in ("run", "mpp") if form.get(k) is not None}
    if not isinstance(slide, UploadFile) or any(isinstance(v, UploadFile) for v in fields.values()):
        await form.close()
        raise ApiError(422, f"Send one slide file under the field '{SLIDE_FIELD}' ('run' and 'mpp' as text fields).")
    for text in [slide.filename or "", *fields.values()]:
        _check_text(text, "The slide's file name or a field")
    request.state.slide_form = form  # closed (its temporary file removed) by the route once copied
    return slide, {k: str(v) for k, v in fields.items()}
