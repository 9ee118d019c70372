"""Per-slide results of a run on a dataset of slides: what a pathologist reads is the slide, not a tile.

Each test slide's probabilities are the mean of its test tiles' stored probabilities (raw, as the
run stored them; tiles are the dataset's images whose group is the slide's file name), its
predicted class their argmax, and its true class the slide's own. The slides then fill the same
Table I and confusion matrix as tiles do (core/evaluation/metrics.py), and each slide's row also
gives the share of its tiles predicted as each class, which tells a clear-cut slide from a mixed one.
Nothing is stored: the rows are computed from the run's predictions each time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from core.errors import UserError
from core.evaluation.metrics import Report, format_report, report_from_labels
from core.store.db import Image, Prediction, Run, Slide
from core.store.records import RunSummary

TITLE = "Per slide (mean of its tiles' probabilities)"


@dataclass(frozen=True)
class SlideRow:
    """One test slide: its classes, the mean of its tiles' probabilities, and its tiles' votes."""

    slide: str  # the slide's file name
    true_class: str
    predicted_class: str
    probabilities: tuple[float, ...]  # mean over its test tiles, in the dataset's class order
    tile_shares: tuple[float, ...]  # share of its test tiles predicted as each class
    n_tiles: int  # its test predictions (tiles, or their augmented copies in the paper's protocol)


@dataclass
class SlideReport(Report):
    """A Report over slides instead of tiles, with each slide's row."""

    slides: list[SlideRow] = field(default_factory=list)


def has_slides(session: Session, dataset_id: int) -> bool:
    """Whether the dataset's images are tiles of slides."""
    return bool(session.scalar(select(exists().where(Slide.dataset_id == dataset_id))))


def slide_report(session: Session, run: Run) -> SlideReport:
    """The run's test results per slide. UserError for a run without test predictions, or on a
    dataset that is not made of slides."""
    classes = list(run.dataset.classes)
    truth = dict(session.execute(select(Slide.file_name, Slide.label).where(Slide.dataset_id == run.dataset_id)).all())
    if not truth:
        raise UserError(f"Run {run.id}'s dataset '{run.dataset.name}' has no slides: its results are per image.")
    rows = session.execute(
        select(Image.group, Prediction.probabilities)
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run.id)
        .order_by(Prediction.id)
    ).all()
    if not rows:
        raise UserError(f"Run {run.id} has no test predictions (status: {run.status.value}).")
    by_slide: dict[str, list[list[float]]] = {}
    for group, probabilities in rows:
        if group in truth:
            by_slide.setdefault(group, []).append(probabilities)
    slides = [
        _slide_row(name, truth[name], np.asarray(probs, dtype=np.float64), classes)
        for name, probs in sorted(by_slide.items())
    ]
    base = report_from_labels(
        [classes.index(r.true_class) for r in slides], [classes.index(r.predicted_class) for r in slides], classes
    )
    return SlideReport(
        classes=base.classes,
        accuracy=base.accuracy,
        rows=base.rows,
        confusion=base.confusion,
        n=base.n,
        protocol=RunSummary.from_dict(run.summary).protocol or "",
        slides=slides,
    )


def _slide_row(name: str, true_class: str, probs: np.ndarray, classes: list[str]) -> SlideRow:
    mean = probs.mean(axis=0)
    votes = np.bincount(probs.argmax(axis=1), minlength=len(classes)) / len(probs)
    return SlideRow(
        slide=name,
        true_class=true_class,
        predicted_class=classes[int(mean.argmax())],
        probabilities=tuple(float(p) for p in mean),
        tile_shares=tuple(float(v) for v in votes),
        n_tiles=len(probs),
    )


def format_slide_report(report: SlideReport) -> str:
    """Each slide's row (probabilities and tile shares per class), then Table I and the confusion
    matrix over slides, as plain text."""
    width = max(5, *(len(r.slide) for r in report.slides)) if report.slides else 5
    cls = max(5, *(len(c) for c in report.classes))
    heads = "  ".join(f"{'p ' + c:>{cls + 2}}" for c in report.classes)
    shares = "  ".join(f"{'tiles ' + c:>{cls + 6}}" for c in report.classes)
    lines = [
        TITLE,
        "",
        f"{'Slide':<{width}}  {'True':<{cls}}  {'Predicted':<{max(cls, 9)}}  {heads}  {shares}  {'Tiles':>5}",
    ]
    for r in report.slides:
        probs = "  ".join(f"{p:>{cls + 2}.3f}" for p in r.probabilities)
        votes = "  ".join(f"{v:>{cls + 6}.0%}" for v in r.tile_shares)
        lines.append(
            f"{r.slide:<{width}}  {r.true_class:<{cls}}  {r.predicted_class:<{max(cls, 9)}}  {probs}  "
            f"{votes}  {r.n_tiles:>5d}"
        )
    lines += ["", format_report(report).replace("test samples", "test slides")]
    return "\n".join(lines)
