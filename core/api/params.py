"""The API's parameters: path ids, query parameters and the text fields of its forms, each read with a
message that names it (422), and typed for the OpenAPI document.

A query parameter is an Annotated type whose validator runs the same reader as a form field, so that
`?run=abc` and a form's `run=abc` get the same words; its refusal reaches the client as a 422 in the
API's error shape (core/api/errors.py). A parameter sent empty (`?run=`) counts as left out.

Values that cannot name anything are 4xx, never 500: an id past the database's 64-bit ids (404 in the
path, 422 as a parameter), a time whose offset moves it out of the calendar, thousands of digits."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError
from starlette.convertors import Convertor, register_url_convertor

from core.api.errors import API_MESSAGE, ApiError
from core.errors import UserError
from core.inference import prediction_log
from core.store.db import RunStatus

MAX_ID = 2**63 - 1  # the database's ids are 64-bit integers: a larger one names no row and cannot be sent
MAX_LOG_ROWS = 10_000


class Id64Convertor(Convertor[int]):
    """A path's id: at most 19 digits (longer paths match no route: 404), so that the thousands of
    digits a path may carry never reach int() (which refuses past 4300 digits) or the database."""

    regex = "[0-9]{1,19}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("id64", Id64Convertor())


def int_param(value: str | None, name: str, low: int = 0, high: int = MAX_ID) -> int | None:
    """A whole number from `low` to `high` (by default any id the database can hold); 422 otherwise."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ApiError(422, f"'{name}' must be a whole number, not {value[:40]!r}.") from None
    if not low <= number <= high:
        raise ApiError(422, f"'{name}' must be a whole number from {low} to {high}, not {value[:40]}.")
    return number


def mpp_param(value: str | None) -> float | None:
    """A slide's microns per pixel (core/slides/reader.py check_mpp); 422 otherwise."""
    if value is None or value == "":
        return None
    from core.slides.reader import check_mpp

    try:
        return check_mpp(float(value), "'mpp'")
    except (ValueError, UserError):
        raise ApiError(
            422, f"'mpp' must be the slide's microns per pixel, from 0.05 to 20, not {value[:40]!r}."
        ) from None


def time_param(value: str | None, name: str) -> datetime | None:
    """An ISO 8601 time as the database keeps it (UTC, no offset); one without an offset is UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        # Its offset can move a time at the calendar's ends (year 1, year 9999) out of it: OverflowError.
        return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment
    except (ValueError, OverflowError):
        raise ApiError(
            422,
            f"'{name}' must be an ISO 8601 time from year 1 to 9999 in UTC, such as "
            f"2026-01-31T09:00:00Z, not {value[:60]!r}.",
        ) from None


def choice_param(value: str | None, name: str, choices: tuple[str, ...]) -> str | None:
    """One of `choices` (None when left out); 422 otherwise."""
    if value is not None and value not in choices:
        raise ApiError(422, f"'{name}' must be one of {', '.join(choices)}, not {value[:40]!r}.")
    return value


def _read_by(reader: Callable[[Any], Any]) -> BeforeValidator:
    """A validator that reads a query parameter with `reader`, its refusal kept in the API's words."""

    def read(value: Any) -> Any:
        if not isinstance(value, str):  # a default, not something sent
            return value
        try:
            return reader(value)
        except ApiError as e:
            raise PydanticCustomError(API_MESSAGE, "{message}", {"message": e.message}) from None

    return BeforeValidator(read)


def _id_query(name: str, description: str) -> Any:
    return Annotated[
        Annotated[int, Field(ge=0, le=MAX_ID)] | None,
        _read_by(lambda v: int_param(v, name)),
        Query(description=description),
    ]


def _text_query(name: str, description: str) -> Any:
    return Annotated[str | None, _read_by(lambda v: v or None), Query(description=description)]


def _time_query(name: str, description: str) -> Any:
    return Annotated[datetime | None, _read_by(lambda v: time_param(v, name)), Query(description=description)]


STATUSES = tuple(s.value for s in RunStatus)

RunQuery = _id_query("run", "the run whose model classifies (default: the approved model)")
RunFilter = _id_query("run", "only this run's")
StatusFilter = Annotated[
    Literal[STATUSES] | None,  # type: ignore[valid-type]
    _read_by(lambda v: choice_param(v, "status", STATUSES)),
    Query(description="only runs in this status"),
]
DatasetFilter = Annotated[str | None, Query(description="only runs of this dataset")]
SinceFilter = _time_query("since", "at or after this time (ISO 8601; UTC without an offset)")
UntilFilter = _time_query("until", "before this time")
UserFilter = Annotated[
    str | None,
    _read_by(lambda v: v or None),
    Query(alias="user", description="only this user's (a viewer: only their own)"),
]
PredictedFilter = _text_query("predicted", "only this predicted class")
LimitQuery = Annotated[
    Annotated[int, Field(ge=1, le=MAX_LOG_ROWS)],
    _read_by(lambda v: int_param(v, "limit", 1, MAX_LOG_ROWS) or prediction_log.DEFAULT_LIMIT),
    Query(description=f"at most this many (default {prediction_log.DEFAULT_LIMIT})"),
]

RunId = Annotated[int, Path(ge=0, le=MAX_ID, description="a run's id")]
JobId = Annotated[int, Path(ge=0, le=MAX_ID, description="a slide job's id")]
