"""What the pages show, as page-ready records: one view function per page or panel.

Each view loads what it shows with its relationships in the same query (a list of runs is one
statement however long it is) and returns frozen dataclasses, so that no ORM object leaves the
session and no page writes SQL (the pattern of MLflow's tracking store and its entities). The rules behind what a page shows live here too: a
run's protocol label, how far it has got, which run has the best honest accuracy.

No torch: listing runs does not load the training code. In core/jobs, the top of the flow, because
a run's record draws on every stage (its config, its split's label, its metrics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from core.config import Settings
from core.data import splits
from core.data.datasets import get_dataset
from core.errors import UserError
from core.evaluation import metrics, yardstick
from core.jobs import worker
from core.store.db import (
    AugmentationPreset, Dataset, EpochMetric, Image, Prediction, Run, RunStatus, make_sessionmaker, utcnow,
)
from core.store.records import RunProgress, RunSummary
from core.store.runs import model_path, run_dir
from core.training.run_config import RunConfig

# A run's status as the pages see it: the RunStatus values, as plain text.
STATUSES = tuple(s.value for s in RunStatus)
ACTIVE = (RunStatus.queued.value, RunStatus.running.value)  # queued or running: the pages poll it


def sessions(database_url: str) -> sessionmaker:
    """The sessions the pages open to call views and core's actions (one sessionmaker per process)."""
    return make_sessionmaker(database_url)


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class RunRow:
    """One run as the pages list it."""

    id: int
    status: str  # a RunStatus value
    dataset: str
    classes: tuple[str, ...]
    config: RunConfig
    summary: RunSummary
    progress: RunProgress
    protocol: str  # e.g. "holdout 80/20, grouped by specimen, seed 0"
    grouped: bool | None  # whether its split keeps each specimen on one side (None: no split recorded)
    experiment: str  # shared by the folds of one k-fold
    fold: int
    split_id: int | None
    seed: int
    weights_used: str | None
    device: str | None
    created_at: datetime
    created_by: str | None
    started_at: datetime | None
    finished_at: datetime | None
    epochs_done: int
    cancel_requested: bool

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def leaky(self) -> bool:
        """The paper's protocol: copies of one image on both sides of the split."""
        return self.config.split == "paper-leaky"

    @property
    def weights(self) -> str:
        """The weights it started from, in short ("imagenet", "none" or a file)."""
        return (self.weights_used or self.config.weights).split(" (")[0]

    @property
    def seconds(self) -> float | None:
        """How long it has run (until now while it runs); None before it started."""
        if self.started_at is None:
            return None
        return max(0.0, ((self.finished_at or utcnow()) - self.started_at).total_seconds())

    def label(self, results: bool = True) -> str:
        """One line naming the run, e.g. 'Run 3 · lymphoma · holdout · 224 px · 25 epoch(s) · 92.0%'.
        Without `results`, only what never changes (a select box keeps the label it first drew)."""
        split = self.config.split
        if split == "kfold":
            split = f"k-fold {self.fold + 1}/{self.config.folds}"
        parts = [f"Run {self.id}", self.dataset, split, f"{self.config.image_size} px", f"{self.config.epochs} epoch(s)"]
        accuracy = self.summary.test_accuracy
        if results and accuracy is not None:
            parts.append(f"{100 * accuracy:.1f}%")
        return " · ".join(p for p in parts if p)

    def progress_bar(self) -> tuple[float, str]:
        """A fraction and a sentence for the run's progress bar."""
        if self.status == RunStatus.queued.value:
            return 0.0, "Queued: waiting for the worker"
        return self.progress.bar(self.config.epochs)


def _protocol(run: Run, config: RunConfig, summary: RunSummary) -> str:
    """The label it was measured under: as the run recorded it, else its split's, else the protocol's name."""
    if summary.protocol:
        return summary.protocol
    if run.split is not None:
        return splits.describe(run.split)
    return config.split


def _run_row(run: Run, epochs_done: int) -> RunRow:
    config, summary = RunConfig.from_dict(run.config), RunSummary.from_dict(run.summary)
    return RunRow(
        id=run.id, status=run.status.value, dataset=run.dataset.name, classes=tuple(run.dataset.classes),
        config=config, summary=summary, progress=RunProgress.from_dict(run.progress),
        protocol=_protocol(run, config, summary), grouped=None if run.split is None else run.split.grouped,
        experiment=run.experiment, fold=run.fold, split_id=run.split_id, seed=run.seed,
        weights_used=run.weights_used, device=run.device, created_at=run.created_at, created_by=run.created_by,
        started_at=run.started_at, finished_at=run.finished_at, epochs_done=epochs_done,
        cancel_requested=run.cancel_requested,
    )


def _epoch_row(e: EpochMetric) -> EpochRow:
    return EpochRow(e.epoch, e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy, e.seconds, e.images_per_second)


def _runs_query(*where: Any):
    """Runs with their dataset, split and number of recorded epochs: one statement, newest first."""
    epochs_done = (select(func.count(EpochMetric.id)).where(EpochMetric.run_id == Run.id)
                   .correlate(Run).scalar_subquery())
    return (select(Run, epochs_done).where(*where).options(joinedload(Run.dataset), joinedload(Run.split))
            .order_by(Run.id.desc()))


def run_rows(session: Session, *, dataset: str | None = None, status: str | None = None) -> list[RunRow]:
    """Every run (of `dataset`, in `status`), newest first: the Runs table, Home, Predict, the CLI."""
    where = []
    if dataset is not None:
        where.append(Run.dataset_id == get_dataset(session, dataset).id)  # UserError naming the known ones
    if status is not None:
        where.append(Run.status == RunStatus(status))
    return [_run_row(run, n) for run, n in session.execute(_runs_query(*where))]


def active_runs(session: Session) -> list[RunRow]:
    """Runs queued or running, oldest first (the order the worker takes them): the Train page's queue."""
    rows = session.execute(_runs_query(Run.status.in_([RunStatus(s) for s in ACTIVE])))
    return sorted((_run_row(run, n) for run, n in rows), key=lambda r: r.id)


def best_honest_run(rows: list[RunRow]) -> RunRow | None:
    """The succeeded run with the best test accuracy under an honest protocol (split before
    augmenting). Runs whose split kept each specimen on one side come first: a split by image lets
    images of one specimen sit on both sides, which flatters the score."""
    honest = [r for r in rows if r.status == RunStatus.succeeded.value and not r.leaky
              and r.summary.test_accuracy is not None]
    return max(honest, key=lambda r: (bool(r.grouped), r.summary.test_accuracy), default=None)


@dataclass(frozen=True)
class RunCurves:
    """A run and its epochs: the Runs page's live panel, and each run of the comparison."""

    run: RunRow
    epochs: tuple[EpochRow, ...]


def run_row(session: Session, run_id: int) -> RunRow:
    found = session.execute(_runs_query(Run.id == run_id)).first()
    if found is None:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    return _run_row(*found)


def run_curves(session: Session, run_ids: list[int]) -> list[RunCurves]:
    """The runs `run_ids` (in that order; unknown ids left out) with their epochs."""
    query = (select(Run).where(Run.id.in_(run_ids))
             .options(joinedload(Run.dataset), joinedload(Run.split), joinedload(Run.epochs)))
    found = {run.id: run for run in session.scalars(query).unique()}
    return [RunCurves(_run_row(run, len(run.epochs)), tuple(_epoch_row(e) for e in run.epochs))
            for run in (found.get(i) for i in run_ids) if run is not None]


def run_curve(session: Session, run_id: int) -> RunCurves:
    found = run_curves(session, [run_id])
    if not found:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    return found[0]


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


@dataclass(frozen=True)
class RunResults:
    """What the Runs page shows of a run that has ended."""

    run: RunRow
    error: str | None
    log: str | None  # the end of its training log
    model_file: Path | None  # its model file (core/inference/model_file.py), when there is one
    timings: dict[str, Any]
    config_json: dict[str, Any]  # the config and summary as stored
    summary_json: dict[str, Any]
    # Of a run that succeeded:
    report: metrics.Report | None = None
    uncertainty: dict[str, Any] | None = None  # metrics.run_uncertainty
    yardstick: str | None = None
    folds: FoldResults | None = None
    predictions: tuple[PredictionRow, ...] = ()

    @property
    def misclassified(self) -> list[PredictionRow]:
        return [p for p in self.predictions if p.true_label != p.predicted_label]


def run_results(session: Session, settings: Settings, run_id: int) -> RunResults:
    """The results of a run: error and log, leak audit, and for a succeeded run its report,
    intervals, k-fold summary and predictions."""
    run = session.scalar(select(Run).where(Run.id == run_id)
                         .options(joinedload(Run.dataset), joinedload(Run.split)))
    if run is None:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    row = _run_row(run, 0)
    folder = run_dir(settings, run_id)
    log = run.log_tail
    if not log and (folder / "train.log").exists():
        log = "\n".join((folder / "train.log").read_text(errors="replace").splitlines()[-60:])
    model = model_path(settings, run_id)
    base = RunResults(row, run.error, log, model if model.exists() else None, dict(run.timings or {}),
                      dict(run.config), dict(run.summary or {}))
    if run.status != RunStatus.succeeded:
        return base
    summary = row.summary
    return dataclasses.replace(
        base, report=metrics.run_report(session, run), uncertainty=metrics.run_uncertainty(session, run),
        yardstick=yardstick.describe(summary.colour_yardstick) if summary.colour_yardstick else None,
        folds=_fold_results(session, run), predictions=_predictions(session, settings, run_id))


def _fold_results(session: Session, run: Run) -> FoldResults | None:
    siblings = session.scalars(select(Run).where(Run.experiment == run.experiment).order_by(Run.fold)
                               .options(joinedload(Run.dataset))).all()
    if len(siblings) < 2:
        return None
    done = [r for r in siblings if r.status == RunStatus.succeeded]
    summary = metrics.summarise_folds([metrics.run_report(session, r) for r in done]) if done else None
    across = yardstick.describe_folds([RunSummary.from_dict(r.summary).colour_yardstick for r in done])
    return FoldResults(len(siblings), len(done), summary, across)


def _predictions(session: Session, settings: Settings, run_id: int) -> tuple[PredictionRow, ...]:
    rows = session.execute(
        select(Prediction, Image.original_name, Image.stored_path, Image.group)
        .join(Image, Image.id == Prediction.image_id).where(Prediction.run_id == run_id).order_by(Prediction.id)
    ).all()
    return tuple(PredictionRow(name, settings.app_home / stored, group, p.aug_index, p.true_label, p.predicted_label,
                               tuple(p.probabilities)) for p, name, stored, group in rows)


# ---------------------------------------------------------------------------------------------
# Datasets and presets


@dataclass(frozen=True)
class DatasetRow:
    name: str
    classes: tuple[str, ...]
    images: int
    groups: int  # specimen groups; 0 when none are known


def dataset_rows(session: Session) -> list[DatasetRow]:
    """Every dataset with its image and group counts, by name: Home, Train, Datasets, Augmentation."""
    query = (select(Dataset, func.count(Image.id), func.count(distinct(Image.group)))
             .outerjoin(Image, Image.dataset_id == Dataset.id).group_by(Dataset.id).order_by(Dataset.name))
    return [DatasetRow(d.name, tuple(d.classes), n, groups) for d, n, groups in session.execute(query)]


@dataclass(frozen=True)
class ImageRow:
    id: int
    label: str
    group: str | None
    original_name: str  # its path inside the source, e.g. "CLL/001.tif"
    stored_path: str  # relative to APP_HOME
    sha256: str
    path: Path  # the stored file

    @property
    def name(self) -> str:
        return Path(self.original_name).name


@dataclass(frozen=True)
class DatasetDetail:
    name: str
    classes: tuple[str, ...]
    source: str
    created_at: datetime
    created_by: str | None
    images: tuple[ImageRow, ...]
    skipped: tuple[tuple[str, str], ...]  # (file, reason)
    n_runs: int

    @property
    def groups(self) -> set[str]:
        return {im.group for im in self.images if im.group is not None}

    def class_counts(self) -> dict[str, int]:
        return {c: sum(im.label == c for im in self.images) for c in self.classes}


def dataset_detail(session: Session, settings: Settings, name: str) -> DatasetDetail:
    """One dataset with its images, skipped files and number of runs: the Datasets and Augmentation pages."""
    n_runs = select(func.count(Run.id)).where(Run.dataset_id == Dataset.id).correlate(Dataset).scalar_subquery()
    found = session.execute(select(Dataset, n_runs).where(Dataset.name == name)
                            .options(selectinload(Dataset.images), selectinload(Dataset.skipped))).first()
    if found is None:
        get_dataset(session, name)  # raises the UserError that names the known datasets
    d, runs = found
    images = tuple(ImageRow(im.id, im.label, im.group, im.original_name, im.stored_path, im.sha256,
                            settings.app_home / im.stored_path) for im in sorted(d.images, key=lambda im: im.id))
    return DatasetDetail(d.name, tuple(d.classes), d.source, d.created_at, d.created_by, images,
                         tuple((f.path, f.reason) for f in d.skipped), runs)


@dataclass(frozen=True)
class PresetRow:
    name: str
    params: dict[str, Any]
    created_at: datetime
    created_by: str | None


def preset_rows(session: Session) -> list[PresetRow]:
    """The saved augmentation presets, by name (the paper's, built in, is not stored)."""
    query = select(AugmentationPreset).order_by(AugmentationPreset.name)
    return [PresetRow(p.name, dict(p.params), p.created_at, p.created_by) for p in session.scalars(query)]


# ---------------------------------------------------------------------------------------------
# Workers


@dataclass(frozen=True)
class WorkerRow:
    id: str
    device: str | None  # as its last run reported; None before its first
    heartbeat_age: float  # seconds
    running: tuple[int, ...]  # the runs it trains now


@dataclass(frozen=True)
class WorkerPanel:
    alive: bool
    queued: int
    workers: tuple[WorkerRow, ...]


def worker_panel(session: Session, settings: Settings) -> WorkerPanel:
    """Live workers, what each trains now, and how many runs wait: the sidebar and Home."""
    status = worker.worker_status(session, settings)
    # A worker lists a run until its next heartbeat; keep only those still running.
    listed = [r for w in status["workers"] for r in w["running"]]
    running = set(session.scalars(select(Run.id).where(Run.id.in_(listed), Run.status == RunStatus.running)))
    workers = tuple(WorkerRow(w["id"], w["device"], w["heartbeat_age"], tuple(r for r in w["running"] if r in running))
                    for w in status["workers"])
    return WorkerPanel(bool(status["alive"]), int(status["queued"]), workers)
