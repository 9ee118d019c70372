"""Field accuracy: how a model did on the predictions people reviewed, as opposed to its test part.

For one run: its accuracy, per-class recall and confusion matrix over the reviewed cases that have
one true class (every review names the same class: core/review/store.py). A case two reviewers
disagree on is left out and counted as such, as is one nobody could tell. With the count, a 95%
bootstrap interval of the accuracy (cases resampled), the share of the run's logged predictions the
model referred, and how often a reviewer overruled the model (a review naming another class than the
model's, counted per review, so reviews of cases in disagreement count too). The same figures per
week of the predictions (weeks start on Monday, UTC). And how many of the reviews were given blind
(the model's answer hidden from the reviewer): one given seeing it can lean toward it. So the
accuracy is given again over the cases every reviewer judged blind, with its own interval. And how
far reviewers agree with each other where a case has two reviews or more: the share of those cases
whose first two reviews agree, and that agreement corrected for chance (Fleiss' kappa for two
ratings a case, "cannot tell" a category of its own): the true classes are only as good as that.

Reviewed cases are not a random draw of the predictions: the queue puts referred and low-confidence
ones first. Field accuracy says how the model did on what people chose to check, which is why the
share referred and the counts stand beside it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.config import Settings
from core.evaluation.calibration import bootstrap_metrics
from core.review.queue import kept_image
from core.review.store import Case, cases
from core.store.db import PredictionLog, Run

LEVEL = 0.95


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class _Shares:
    """The shares both a week and the whole report give: referred of the predictions, overruled of the
    reviews naming a class."""

    predictions: int
    referred: int
    class_reviews: int
    overruled: int

    @property
    def referred_share(self) -> float | None:
        return _share(self.referred, self.predictions)

    @property
    def overruled_share(self) -> float | None:
        return _share(self.overruled, self.class_reviews)


@dataclass(frozen=True)
class WeekFigures(_Shares):
    """One week's predictions of a run (by when they were made) and their reviews."""

    week: date  # its Monday
    predictions: int  # logged predictions still in the log
    referred: int
    counted: int  # reviewed cases with one true class
    right: int  # of those, the model's class was the true class
    class_reviews: int  # reviews naming a class
    overruled: int  # of those, naming another class than the model's

    @property
    def accuracy(self) -> float | None:
        return _share(self.right, self.counted)


@dataclass(frozen=True)
class FieldAccuracy(_Shares):
    """A run's field accuracy (see the module's docstring)."""

    run_id: int
    classes: tuple[str, ...]
    reviewed: int  # cases with at least one review
    counted: int  # with one true class: the cases accuracy is over
    disagreements: int  # left out: reviews differ
    cannot_tell: int  # left out: no reviewer could tell
    accuracy: float | None  # None: no case counted
    low: float | None  # the bootstrap interval at `level`
    high: float | None
    recall: tuple[float | None, ...]  # per class; None where no counted case is of that class
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: the model's class
    predictions: int  # the run's logged predictions still in the log
    referred: int
    class_reviews: int
    overruled: int
    blind: int  # of class_reviews, given without seeing the model's answer
    blind_counted: int  # counted cases whose every review was blind
    blind_accuracy: float | None  # over those; None: none
    blind_low: float | None
    blind_high: float | None
    paired: int  # cases with two reviews or more
    paired_agreed: int  # of those, the cases whose first two reviews agree
    kappa: float | None  # their chance-corrected agreement; None: undefined (under 2 cases, or one verdict)
    weeks: tuple[WeekFigures, ...]  # oldest first
    level: float = LEVEL

    @property
    def agreement_share(self) -> float | None:
        """Of the cases reviewed twice or more, the share whose first two reviews agree."""
        return _share(self.paired_agreed, self.paired)

    def summary(self) -> str:
        """One sentence, e.g. 'Right on 41 of 50 reviewed predictions (82.0%, 95% interval 71.0% to 92.0%);
        2 left out where reviewers disagree, 1 where none could tell.'"""
        if not self.counted:
            head = "No reviewed prediction of this model has one agreed true class yet"
        else:
            right = sum(self.confusion[k][k] for k in range(len(self.classes)))
            head = (
                f"Right on {right} of {self.counted} reviewed prediction(s) ({self.accuracy:.1%}, "
                f"{self.level:.0%} interval {self.low:.1%} to {self.high:.1%})"
            )
        words = [
            f"{head}; {self.disagreements} left out where reviewers disagree, {self.cannot_tell} where none could tell."
        ]
        if self.class_reviews:
            words.append(
                f"{self.blind} of {self.class_reviews} review(s) naming a class were given blind, without seeing "
                "the model's answer; one given seeing it can lean toward it."
            )
        if self.blind_counted:
            words.append(
                f"Over the {self.blind_counted} case(s) every reviewer judged blind: {self.blind_accuracy:.1%} "
                f"({self.level:.0%} interval {self.blind_low:.1%} to {self.blind_high:.1%})."
            )
        if self.paired:
            kappa = "" if self.kappa is None else f", {self.kappa:.2f} once corrected for chance (Fleiss' kappa)"
            words.append(
                f"Reviewers agree with each other on {self.paired_agreed} of the {self.paired} case(s) reviewed "
                f"twice or more{kappa}."
            )
        return " ".join(words)

    def to_json(self) -> dict:
        """The record as JSON-able values (dates as ISO text), for the API."""
        out = asdict(self)
        out["weeks"] = [{**asdict(w), "week": w.week.isoformat()} for w in self.weeks]
        out["classes"], out["recall"] = list(self.classes), list(self.recall)
        out["confusion"] = [list(row) for row in self.confusion]
        out.update(referred_share=self.referred_share, overruled_share=self.overruled_share)
        return out


@dataclass(frozen=True)
class FieldCellCase:
    """A reviewed case in one cell of the field confusion matrix."""

    log_id: int
    image_name: str | None  # None: its log row was pruned since
    image_path: Path | None  # the kept image; None: not kept
    probabilities: dict[str, float] | None  # as logged; None: its log row was pruned since
    probability_kind: str | None  # "calibrated" or "raw"


def field_cell(
    session: Session, settings: Settings, user: User, run_id: int, true_class: str, predicted: str
) -> list[FieldCellCase]:
    """The counted cases of run `run_id` that reviewers agree are `true_class` and the model called
    `predicted`: one cell of the field confusion matrix, newest first. Editors only: the images and
    file names are those of the cases people sent to be classified."""
    require_editor(user, "see the reviewed images")
    chosen = [c for c in cases(session, run_id=run_id) if c.true_class == true_class and c.predicted == predicted]
    rows = {
        r.id: r for r in session.scalars(select(PredictionLog).where(PredictionLog.id.in_([c.log_id for c in chosen])))
    }
    found = []
    for c in sorted(chosen, key=lambda c: c.predicted_at, reverse=True):
        row = rows.get(c.log_id)
        found.append(
            FieldCellCase(
                log_id=c.log_id,
                image_name=None if row is None else row.image_name,
                image_path=kept_image(settings, c.image_sha256),
                probabilities=None if row is None else dict(row.probabilities),
                probability_kind=None if row is None else row.probability_kind,
            )
        )
    return found


def week_of(at: datetime) -> date:
    """The Monday of `at`'s week."""
    return at.date() - timedelta(days=at.weekday())


def field_accuracy(session: Session, run_id: int, *, resamples: int = 1000) -> FieldAccuracy:
    """The field accuracy of run `run_id` from its reviews and its logged predictions."""
    reviewed = cases(session, run_id=run_id)
    classes = _classes(session, run_id, reviewed)
    counted = [c for c in reviewed if c.true_class is not None]
    index = {name: k for k, name in enumerate(classes)}
    confusion = [[0] * len(classes) for _ in classes]
    for c in counted:
        confusion[index[c.true_class]][index[c.predicted]] += 1
    accuracy, low, high = _accuracy(counted, classes, resamples)
    blind = [c for c in counted if all(r.blind for r in c.reviews)]
    blind_accuracy, blind_low, blind_high = _accuracy(blind, classes, resamples)
    recall = tuple(_share(confusion[k][k], sum(confusion[k])) for k in range(len(classes)))
    logged = session.execute(select(PredictionLog.at, PredictionLog.refer).where(PredictionLog.run_id == run_id)).all()
    reviews = [r for c in reviewed for r in c.reviews if r.true_class is not None]
    return FieldAccuracy(
        run_id=run_id,
        classes=tuple(classes),
        reviewed=len(reviewed),
        counted=len(counted),
        disagreements=sum(c.disagreement for c in reviewed),
        cannot_tell=sum(c.cannot_tell for c in reviewed),
        accuracy=accuracy,
        low=low,
        high=high,
        recall=recall,
        confusion=tuple(tuple(row) for row in confusion),
        predictions=len(logged),
        referred=sum(refer is True for _, refer in logged),
        class_reviews=len(reviews),
        overruled=sum(r.overruled for r in reviews),
        blind=sum(r.blind for r in reviews),
        blind_counted=len(blind),
        blind_accuracy=blind_accuracy,
        blind_low=blind_low,
        blind_high=blind_high,
        **_agreement(reviewed),
        weeks=_weeks(logged, counted, reviewed),
    )


def _agreement(reviewed: list[Case]) -> dict[str, Any]:
    """`paired`, `paired_agreed` and `kappa` of FieldAccuracy: over the cases with two reviews or more,
    their first two reviews (oldest first). Kappa is Fleiss' for two ratings a case (so it does not
    matter who gave which), 'cannot tell' being a category of its own."""
    pairs = [(c.reviews[0].verdict, c.reviews[1].verdict) for c in reviewed if len(c.reviews) >= 2]
    agreed = sum(a == b for a, b in pairs)
    counts = Counter(v for pair in pairs for v in pair)
    expected = sum((n / (2 * len(pairs))) ** 2 for n in counts.values())
    kappa = None if len(pairs) < 2 or expected >= 1 else (agreed / len(pairs) - expected) / (1 - expected)
    return {"paired": len(pairs), "paired_agreed": agreed, "kappa": kappa}


def _accuracy(counted: list[Case], classes: list[str], resamples: int) -> tuple[float | None, ...]:
    """Accuracy over `counted` (cases with one true class) and its bootstrap interval; Nones for none."""
    if not counted:
        return None, None, None
    index = {name: k for k, name in enumerate(classes)}
    boot = bootstrap_metrics(
        [index[c.true_class] for c in counted],
        [index[c.predicted] for c in counted],
        classes,
        n_resamples=resamples,
        level=LEVEL,
    )
    return boot.accuracy.estimate, boot.accuracy.low, boot.accuracy.high


def _classes(session: Session, run_id: int, reviewed: list[Case]) -> list[str]:
    """The model's classes: its dataset's (a model's classes are its dataset's, in order); for a run
    deleted since, those of a logged prediction of it, else those its reviews name."""
    run = session.get(Run, run_id)
    if run is not None:
        return list(run.dataset.classes)
    probabilities = session.scalar(select(PredictionLog.probabilities).where(PredictionLog.run_id == run_id).limit(1))
    if probabilities:
        return list(probabilities)
    return sorted({c.predicted for c in reviewed} | {r.true_class for c in reviewed for r in c.reviews} - {None})


def _weeks(logged: list, counted: list[Case], reviewed: list[Case]) -> tuple[WeekFigures, ...]:
    figures: dict[date, dict[str, int]] = defaultdict(lambda: dict.fromkeys(WEEK_COUNTS, 0))
    for at, refer in logged:
        week = figures[week_of(at)]
        week["predictions"] += 1
        week["referred"] += refer is True
    for c in counted:
        week = figures[week_of(c.predicted_at)]
        week["counted"] += 1
        week["right"] += c.true_class == c.predicted
    for c in reviewed:
        for r in c.reviews:
            if r.true_class is not None:
                week = figures[week_of(c.predicted_at)]
                week["class_reviews"] += 1
                week["overruled"] += r.overruled
    return tuple(WeekFigures(week, **counts) for week, counts in sorted(figures.items()))


WEEK_COUNTS = ("predictions", "referred", "counted", "right", "class_reviews", "overruled")
