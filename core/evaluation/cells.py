"""The images behind one cell of a run's confusion matrix: its test images of one true class that
the model put in one predicted class, or, on a dataset of slides, the test slides of that cell with
their tiles.

The cells are the matrices' own: a test image's cell is its stored true and predicted label
(core/evaluation/metrics.py run_report), a slide's the one core/evaluation/slides.py gives it (the
mean of its test tiles' probabilities), so a cell holds exactly as many images or slides as the
matrix counts in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.errors import UserError
from core.evaluation import slides
from core.store.db import Image, Prediction, Run, RunStatus
from core.store.runs import get_run


@dataclass(frozen=True)
class CellImage:
    """One test sample of a cell."""

    image_id: int
    name: str  # its path inside its source, e.g. "CLL/001.tif"
    path: Path  # the stored file
    aug_index: int | None  # which augmented copy (the paper's protocol only)
    probabilities: tuple[float, ...]  # in the run's class order, raw as stored

    @property
    def short_name(self) -> str:
        return Path(self.name).name


@dataclass(frozen=True)
class CellSlide:
    """One test slide of a per-slide cell, with the test tiles its verdict is the mean of."""

    slide: str
    probabilities: tuple[float, ...]  # the mean of its tiles'
    tiles: tuple[CellImage, ...]


def _succeeded(session: Session, run_id: int) -> Run:
    run = get_run(session, run_id)
    if run.status != RunStatus.succeeded:
        raise UserError(f"Run {run_id} is {run.status.value}: only a run that succeeded has test results.")
    return run


def _class_index(run: Run, name: str) -> int:
    classes = list(run.dataset.classes)
    if name not in classes:
        raise UserError(f"Run {run.id} has classes {', '.join(classes)}; {name} is not one of them.")
    return classes.index(name)


def _samples(session: Session, settings: Settings, run_id: int, *where) -> list[tuple[str | None, CellImage]]:
    rows = session.execute(
        select(Prediction, Image.original_name, Image.stored_path, Image.group)
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run_id, *where)
        .order_by(Prediction.id)
    ).all()
    return [
        (group, CellImage(p.image_id, name, settings.app_home / stored, p.aug_index, tuple(p.probabilities)))
        for p, name, stored, group in rows
    ]


def cell_images(
    session: Session, settings: Settings, run_id: int, true_class: str, predicted_class: str
) -> list[CellImage]:
    """The test samples of run `run_id` of true class `true_class` predicted as `predicted_class`,
    in the order they were tested."""
    run = _succeeded(session, run_id)
    truth, predicted = _class_index(run, true_class), _class_index(run, predicted_class)
    found = _samples(session, settings, run_id, Prediction.true_label == truth, Prediction.predicted_label == predicted)
    return [image for _, image in found]


def slide_cell(
    session: Session, settings: Settings, run_id: int, true_class: str, predicted_class: str
) -> list[CellSlide]:
    """The test slides of run `run_id` whose class is `true_class` and whose verdict (the mean of their
    tiles' probabilities) is `predicted_class`, by name, each with its test tiles."""
    run = _succeeded(session, run_id)
    for name in (true_class, predicted_class):  # a class the run lacks is a plain error, not an empty cell
        _class_index(run, name)
    report = slides.slide_report(session, run)
    chosen = {r.slide: r for r in report.slides if (r.true_class, r.predicted_class) == (true_class, predicted_class)}
    tiles: dict[str, list[CellImage]] = {}
    for group, image in _samples(session, settings, run_id, Image.group.in_(list(chosen))):
        tiles.setdefault(group, []).append(image)
    return [CellSlide(name, chosen[name].probabilities, tuple(tiles.get(name, ()))) for name in sorted(chosen)]
