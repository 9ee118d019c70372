"""What the Runs page shows of a run that has ended: its error and log, its report and intervals,
its calibration in words, its colour-only yardstick, its k-fold experiment and its predictions."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from core.config import Settings
from core.errors import UserError
from core.evaluation import compare, metrics, slides, yardstick
from core.evaluation.calibration_words import CalibrationWords, calibration_words
from core.jobs import manage
from core.jobs.views.formatting import failure_message
from core.jobs.views.runs import RunRow, rows_of
from core.store.db import Image, Prediction, Run, RunStatus
from core.store.records import RunSummary
from core.store.runs import model_path, run_dir


@dataclass(frozen=True)
class PredictionRow:
    """One test sample's prediction and the source image it came from."""

    image: str  # the image's path inside its source, e.g. "CLL/001.tif"
    path: Path  # the stored file
    group: str | None
    aug_index: int | None  # which augmented copy (paper-leaky protocol only)
    true_label: int
    predicted_label: int
    probabilities: tuple[float, ...]

    @property
    def name(self) -> str:
        return Path(self.image).name


@dataclass(frozen=True)
class FoldResults:
    """The k-fold experiment a run belongs to."""

    n_folds: int
    n_done: int
    summary: metrics.FoldSummary | None  # over the finished folds
    yardstick: str | None  # the colour-only yardstick across them
    spread: str | None = None  # whether the folds' accuracies differ beyond noise


@dataclass(frozen=True)
class RunResults:
    """What the Runs page shows of a run that has ended."""

    run: RunRow
    error: str | None  # as recorded, in the command line's words
    log: str | None  # the end of its training log
    model_file: Path | None  # its model file (core/inference/model_file.py), when there is one
    timings: dict[str, Any]
    config_json: dict[str, Any]  # the config and summary as stored
    summary_json: dict[str, Any]
    resumable: bool = False  # queued again, it continues from a finished epoch (manage.resumable)
    # Of a run that succeeded:
    report: metrics.Report | None = None
    uncertainty: metrics.RunUncertainty | None = None
    calibration: CalibrationWords | None = None
    yardstick: str | None = None
    folds: FoldResults | None = None
    predictions: tuple[PredictionRow, ...] = ()
    slides: Any = None  # core/evaluation/slides.py SlideReport, for a run on a dataset of slides

    @property
    def misclassified(self) -> list[PredictionRow]:
        return [p for p in self.predictions if p.true_label != p.predicted_label]

    @property
    def message(self) -> str | None:
        """A failed run's error for the page: its first line, in the pages' words where they differ."""
        return failure_message(self.error, self.run.summary)

    @property
    def technical_log(self) -> str | None:
        """What the engineer reads: the error as recorded in full, then the end of the training log."""
        parts = [p for p in (self.error if self.error != self.message else None, self.log) if p]
        return "\n\n".join(parts) or None


def run_results(session: Session, settings: Settings, run_id: int) -> RunResults:
    """The results of a run: error and log, leak audit, and for a succeeded run its report,
    intervals, calibration, colour-only yardstick, k-fold summary and predictions."""
    run = session.scalar(select(Run).where(Run.id == run_id).options(joinedload(Run.dataset), joinedload(Run.split)))
    if run is None:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    row = rows_of(session, [(run, 0)])[0]
    folder = run_dir(settings, run_id)
    log = run.log_tail
    if not log and (folder / "train.log").exists():
        log = "\n".join((folder / "train.log").read_text(errors="replace").splitlines()[-60:])
    model = model_path(settings, run_id)
    base = RunResults(
        row,
        run.error,
        log,
        model if model.exists() else None,
        dict(run.timings or {}),
        dict(run.config),
        dict(run.summary or {}),
        manage.resumable(settings, run_id),
    )
    if run.status != RunStatus.succeeded:
        return base
    summary = row.summary
    return dataclasses.replace(
        base,
        report=metrics.run_report(session, run),
        uncertainty=metrics.run_uncertainty(session, run),
        calibration=calibration_words(summary.calibration),
        yardstick=yardstick.describe(summary.colour_yardstick),
        folds=_fold_results(session, run),
        predictions=_predictions(session, settings, run_id),
        slides=slides.slide_report(session, run) if slides.has_slides(session, run.dataset_id) else None,
    )


def _fold_results(session: Session, run: Run) -> FoldResults | None:
    siblings = session.scalars(
        select(Run).where(Run.experiment == run.experiment).order_by(Run.fold).options(joinedload(Run.dataset))
    ).all()
    if len(siblings) < 2:
        return None
    done = [r for r in siblings if r.status == RunStatus.succeeded]
    reports = [metrics.run_report(session, r) for r in done]
    summary = metrics.summarise_folds(reports) if done else None
    across = yardstick.describe_folds([RunSummary.from_dict(r.summary).colour_yardstick for r in done])
    return FoldResults(len(siblings), len(done), summary, across, fold_spread_words(reports))


def fold_spread_words(reports: Sequence[metrics.Report]) -> str | None:
    """Whether the folds' accuracies differ beyond noise (None with fewer than two scored)."""
    spread = compare.fold_spread([round(r.accuracy * r.n) for r in reports], [r.n for r in reports])
    return spread.verdict() if spread else None


def _predictions(session: Session, settings: Settings, run_id: int) -> tuple[PredictionRow, ...]:
    rows = session.execute(
        select(Prediction, Image.original_name, Image.stored_path, Image.group)
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run_id)
        .order_by(Prediction.id)
    ).all()
    return tuple(
        PredictionRow(
            name,
            settings.app_home / stored,
            group,
            p.aug_index,
            p.true_label,
            p.predicted_label,
            tuple(p.probabilities),
        )
        for p, name, stored, group in rows
    )
