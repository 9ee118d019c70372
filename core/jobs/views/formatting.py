"""Figures and messages in the pages' words: intervals, speeds and durations as text (durations are
core/words.py's, said here too for the pages), a failed run's error as a page says it, server paths
left out of what a reader sees."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from core.store.db import utcnow
from core.store.records import RunSummary
from core.words import duration_text as duration_text  # said here too, for the pages

# An absolute path on the server (two components at least) where a message or a log quotes one: after
# the start, white space, a quote, a bracket or "=", so that addresses (http://...) and fractions
# (80/20) are left alone.
_SERVER_PATH = re.compile(r"""(?<![^\s'"(\[=])/[^\s/'"()\[\]]+(?:/[^\s/'"()\[\]]*)+""")


def without_paths(text: str) -> str:
    """`text` with every absolute server path replaced by its last part (a file's or folder's own
    name): where the app is installed and how its folders are laid out is no reader's business, and
    a message names a file well enough by its name. Editors read the paths in the technical log."""
    return _SERVER_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def without_paths_in(value: Any) -> Any:
    """`value` (JSON: dicts, lists, strings, numbers) with `without_paths` applied to every string."""
    if isinstance(value, str):
        return without_paths(value)
    if isinstance(value, dict):
        return {k: without_paths_in(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_paths_in(v) for v in value]
    return value


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def interval_text(interval: tuple[float, float] | None) -> str | None:
    """'25.5–81.1%', or None without an interval."""
    if interval is None or interval[0] != interval[0]:  # none, or nan
        return None
    return f"{interval[0]:.1%}–{interval[1]:.1%}"


def accuracy_text(accuracy: float | None, interval: tuple[float, float] | None) -> str | None:
    """'53.8% (25.5–81.1%)': an accuracy with its 95% interval, for tables; None without a figure."""
    if accuracy is None:
        return None
    between = interval_text(interval)
    return f"{accuracy:.1%}" if between is None else f"{accuracy:.1%} ({between})"


def speed_text(images_per_second: float | None) -> str:
    """A training speed to 3 significant figures ('0.42 images/s', '12.3 images/s', '1,234 images/s')."""
    if images_per_second is None:
        return "–"
    if images_per_second >= 100:
        return f"{images_per_second:,.0f} images/s"
    return f"{images_per_second:.3g} images/s"


def plain_calibration_words(text: str) -> str:
    """A reliability chart's trace names (core/evaluation/calibration.py) in the pages' words."""
    return text.replace("temperature-scaled", "after confidence scaling").replace("ECE", "calibration error")


def seconds_since(moment: datetime) -> float:
    return max(0.0, (utcnow() - moment).total_seconds())


def failure_message(error: str | None, summary: RunSummary) -> str | None:
    """A run's recorded error as a page says it: the pages' words where the error has them
    (RunSummary.error_page), else its first line (the rest, often a process's output, is for the
    technical log); a server path in it by its last part (`without_paths`)."""
    if error is None:
        return None
    text = summary.error_page or error
    return without_paths(text.strip().splitlines()[0] if text.strip() else text)
