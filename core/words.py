"""Figures in plain words that every layer says the same way: how long something takes.

Imports nothing of the project, so that the store's records, the jobs, the views and the pages can
all use it without a cycle.
"""

from __future__ import annotations

SECONDS_UP_TO = 90  # below this, in seconds: "75 s" reads better than "1 min"
MINUTES_UP_TO = 90 * 60  # below this, in minutes; from here on in hours to a tenth


def duration_text(seconds: float | None, *, long: bool = False) -> str:
    """A stretch of time in words: '40 s', '3 min', '1.5 h'; with `long` (inside a sentence) '3
    minutes', '1 minute', '1.5 hours'. None (not known yet) is '–'; a negative span counts as none."""
    if seconds is None:
        return "–"
    seconds = max(0.0, seconds)
    if seconds < SECONDS_UP_TO:
        return f"{seconds:.0f} s"
    if seconds < MINUTES_UP_TO:
        minutes = round(seconds / 60)
        return f"{minutes} minute{'' if minutes == 1 else 's'}" if long else f"{minutes} min"
    hours = f"{seconds / 3600:.1f}"
    return f"{hours} hours" if long else f"{hours} h"
