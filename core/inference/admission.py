"""How much image decoding a prediction may take on, before it starts.

Decoding is where a prediction's memory goes: a PNG of a few hundred kB can declare 100 MP, which
take 300 to 400 MB once decoded. core/inference/service.py decodes one image at a time, so a
prediction holds at most one decoded frame; this module bounds how many such predictions run and
how many pixels they decode, counted from the images' headers before any is decoded:

    MAX_PREDICT_PIXELS          one request's images together           (TooManyPixels: API 413)
    MAX_USER_PREDICT_PIXELS     one person's requests under way or
                                waiting, together                       (UserBusy: API 429)
    MAX_CONCURRENT_PREDICTIONS  requests decoding and classifying in    (ServerBusy after waiting
                                this process at once                     PREDICT_WAIT_SECONDS: API 503)

The counts live in this process's memory, shared by its threads (the pages' script runs and the
API's worker threads); a limit of 0 is no limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from core.config import Settings
from core.errors import UserError

_turns = threading.Condition()
_running = 0  # predictions holding a turn
_pixels_of: dict[str, int] = {}  # person -> pixels of their predictions running or waiting for a turn


class TooManyPixels(UserError):
    """More pixels than one request, or one person, may decode."""


class UserBusy(UserError):
    """The person's predictions under way already take their share."""


class ServerBusy(UserError):
    """Every turn was taken for as long as a prediction waits; `retry_after`: seconds to wait."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _mp(pixels: int) -> str:
    """Megapixels in words: 1.2 MP, 2,000 MP."""
    return f"{pixels / 1e6:,.{1 if pixels < 100_000_000 else 0}f} MP"


def check_pixels(settings: Settings, pixels: int, images: int) -> None:
    """TooManyPixels when `images` images of `pixels` pixels together are more than one request, or
    one person at once, may decode."""
    for limit, name, whose in (
        (settings.max_predict_pixels, "MAX_PREDICT_PIXELS", "one request"),
        (settings.max_user_predict_pixels, "MAX_USER_PREDICT_PIXELS", "one person at once"),
    ):
        if limit and pixels > limit:
            raise TooManyPixels(
                f"These {images} image(s) have {_mp(pixels)} together, more than {whose} may "
                f"classify ({_mp(limit)}, {name}). Send fewer or smaller images at a time."
            )


@contextmanager
def admitted(settings: Settings, person: str, pixels: int, images: int = 1) -> Iterator[None]:
    """Hold a turn to decode and classify `pixels` pixels for `person`, released on leaving.

    Refused at once when the request alone is over its limits (TooManyPixels) or the person's
    predictions under way would pass theirs (UserBusy); waits up to PREDICT_WAIT_SECONDS for one of
    the MAX_CONCURRENT_PREDICTIONS turns, then ServerBusy."""
    global _running
    check_pixels(settings, pixels, images)
    with _turns:
        held = _pixels_of.get(person, 0)
        if settings.max_user_predict_pixels and held + pixels > settings.max_user_predict_pixels:
            raise UserBusy(
                f"Your predictions under way already decode {_mp(held)}; with these {_mp(pixels)} they "
                f"would pass the {_mp(settings.max_user_predict_pixels)} one person may have at once "
                "(MAX_USER_PREDICT_PIXELS). Wait for them to finish, then send these again."
            )
        _pixels_of[person] = held + pixels  # counted while waiting too, so waiting requests add up
        try:
            _take_turn(settings)
        except BaseException:
            _release(person, pixels)
            raise
    try:
        yield
    finally:
        with _turns:
            _running -= 1
            _release(person, pixels)
            _turns.notify()


def _take_turn(settings: Settings) -> None:
    """Wait (holding `_turns`) for a free turn and take it."""
    global _running
    slots, wait = settings.max_concurrent_predictions, settings.predict_wait_seconds
    deadline = time.monotonic() + wait
    while slots and _running >= slots:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerBusy(
                f"The server is classifying {_running} other request(s), as many as it takes at once "
                f"(MAX_CONCURRENT_PREDICTIONS), and none finished within {wait:g} s. Try again in a "
                "moment.",
                retry_after=max(1, round(wait)),
            )
        _turns.wait(left)
    _running += 1


def _release(person: str, pixels: int) -> None:
    left = _pixels_of.get(person, 0) - pixels
    if left > 0:
        _pixels_of[person] = left
    else:
        _pixels_of.pop(person, None)


def under_way() -> tuple[int, dict[str, int]]:
    """(predictions holding a turn, pixels per person running or waiting): for tests and the log."""
    with _turns:
        return _running, dict(_pixels_of)
