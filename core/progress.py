"""How far a piece of work is, said the same way for a training run, a slide being classified and an
ingest: the one record (`Progress`), the callbacks that report it, and the time left at the rate so far.

Imports nothing of the project, so that the store's records, the data, the transforms and the jobs
can all use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.words import duration_text

ProgressCallback = Callable[[int, int], None]  # (done, total): images checked at ingest, slides tiled, tiles classified
StageCallback = Callable[[str, int, int], None]  # (stage, done, total): a run's data preparation, stage by stage


@dataclass(frozen=True)
class Progress:
    """Where a piece of work is: `done` of `total` units (None: not known yet), what is being done in
    words, and about how long is left (None: not known yet)."""

    done: int = 0
    total: int | None = None
    words: str = ""
    seconds_left: float | None = None

    @property
    def fraction(self) -> float:
        """The share done, 0 to 1 (0 while the total is not known)."""
        return min(1.0, max(0.0, self.done / self.total)) if self.total else 0.0

    def text(self) -> str:
        """The words, and the time left where it is known: 'Epoch 2 of 3, step 4 of 10 · about 45 s left'."""
        left = "" if self.seconds_left is None else f" · about {duration_text(self.seconds_left)} left"
        return f"{self.words}{left}"


def seconds_left(elapsed: float, done: int, total: int | None) -> float | None:
    """The time the rest takes at the rate so far (`elapsed` seconds for `done` units); None before
    any unit is done or while the total is not known."""
    if not done or not total:
        return None
    return max(0.0, elapsed / done * (total - done))
