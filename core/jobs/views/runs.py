"""Runs as the pages list them: RunRow (its typed config, summary and progress, its labels), a run's
epochs (RunCurves), which run is the best honest one, and the words for a run's settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload, sessionmaker

from core.data import splits
from core.data.datasets import get_dataset
from core.errors import UserError
from core.jobs.views.formatting import plural, without_paths
from core.store.db import AugmentationPreset, EpochMetric, Run, RunStatus, utcnow
from core.store.engine import make_sessionmaker
from core.store.records import RunProgress, RunSummary
from core.training.presets import PAPER_PRESET
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams

# A run's status as the pages see it: the RunStatus values, as plain text.
STATUSES = tuple(s.value for s in RunStatus)
ACTIVE = (RunStatus.queued.value, RunStatus.running.value)  # queued or running: the pages poll it


def sessions(database_url: str) -> sessionmaker:
    """The sessions the pages open to call views and core's actions (one sessionmaker per process)."""
    return make_sessionmaker(database_url)


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
    name: str | None = None  # the person's own name for it, when they gave one
    notes: str | None = None
    # The augmentation preset whose values it trained with: PAPER_PRESET, a saved preset's name, or
    # None when no preset holds them (any more).
    augmentation_preset: str | None = PAPER_PRESET
    groups_estimated: bool = False  # its dataset's specimen groups were estimated from file numbers

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def leaky(self) -> bool:
        """The paper's protocol: copies of one image on both sides of the split."""
        return self.config.split == "paper-leaky"

    @property
    def weights(self) -> str:
        """The weights it started from, in short ("imagenet", "none" or a file by its name)."""
        return without_paths((self.weights_used or self.config.weights).split(" (")[0])

    @property
    def version_text(self) -> str:
        """The version of its dataset it trained on, e.g. "version 2" (core/data/versions.py)."""
        number = self.config.dataset_version
        return "recorded before dataset versions" if number is None else f"version {number}"

    @property
    def seconds(self) -> float | None:
        """How long it has run (until now while it runs); None before it started."""
        if self.started_at is None:
            return None
        return max(0.0, ((self.finished_at or utcnow()) - self.started_at).total_seconds())

    @property
    def augmentation(self) -> str:
        """The augmentation it trained with, by its preset's name."""
        return self.augmentation_preset or "custom augmentation (no saved preset holds its values)"

    @property
    def title(self) -> str:
        """What the run is called: its own name, else its dataset and what sets its settings apart
        from the paper's, e.g. 'lymphoma · holdout · 64 px · 3 epochs · HED jitter 0.05'."""
        return self.name or " · ".join([self.dataset, *setting_words(self.config, self.augmentation_preset, self.fold)])

    def label(self, results: bool = True) -> str:
        """One line naming the run, e.g. 'Run 3 · lymphoma · holdout · 64 px · 3 epochs · 92.0%'.
        Without `results`, only what never changes (a select box keeps the label it first drew)."""
        parts = [f"Run {self.id}", self.title]
        accuracy = self.summary.test_accuracy
        if results and accuracy is not None:
            parts.append(f"{100 * accuracy:.1f}%")
        return " · ".join(p for p in parts if p)

    def progress_bar(self) -> tuple[float, str]:
        """A fraction and a sentence for the run's progress bar."""
        if self.status == RunStatus.queued.value:
            return 0.0, "Queued: waiting for the worker"
        if self.status == RunStatus.succeeded.value:  # its last progress may name the test phase
            return 1.0, "Finished"
        return self.progress.bar(self.config.epochs)


def _protocol(run: Run, config: RunConfig, summary: RunSummary) -> str:
    """The label it was measured under: as the run recorded it, else its split's, else the protocol's name."""
    if summary.protocol:
        return summary.protocol
    if run.split is not None:
        return splits.describe(run.split)
    return config.split


# The paper's settings are RunConfig's defaults; a run's title names what it changed.
PAPER = RunConfig(dataset="")
PAPER_AUGMENTATION = AugmentParams().to_dict()


def setting_words(config: RunConfig, augmentation_preset: str | None = PAPER_PRESET, fold: int = 0) -> list[str]:
    """Its protocol, then each setting that differs from the paper's, most telling first, in a few words."""
    split = {"holdout": "holdout", "paper-leaky": "the paper's leaky split"}.get(
        config.split, f"k-fold {fold + 1}/{config.folds}"
    )
    checks = [
        (config.image_size != PAPER.image_size, f"{config.image_size} px"),
        (config.epochs != PAPER.epochs, plural(config.epochs, "epoch")),
        (config.patience != PAPER.patience, f"early stopping after {plural(config.patience, 'flat epoch')}"),
        (config.augmentation != PAPER.augmentation, augmentation_preset or "custom augmentation"),
        (config.stain_normalisation != PAPER.stain_normalisation, f"{config.stain_normalisation} stain normalisation"),
        (config.hed_jitter != PAPER.hed_jitter, f"HED jitter {config.hed_jitter:g}"),
        (config.tiles != PAPER.tiles, plural(config.tiles, "tile")),
        (config.tta != PAPER.tta, "test-time flips"),
        (config.weights != PAPER.weights, "random start" if config.weights == "none" else "own weights file"),
        (config.per_class != PAPER.per_class, f"{config.per_class} per class"),
        (config.batch_size != PAPER.batch_size, f"batch {config.batch_size}"),
        (config.lr != PAPER.lr, f"learning rate {config.lr:g}"),
        (config.test_fraction != PAPER.test_fraction and config.split != "kfold", f"test {config.test_fraction:.0%}"),
        (
            config.val_fraction != PAPER.val_fraction,
            f"validation {config.val_fraction:.0%}" if config.val_fraction else "no validation",
        ),
        (config.seed != PAPER.seed, f"seed {config.seed}"),
    ]
    return [split, *(words for differs, words in checks if differs)]


def _preset_names(session: Session, configs: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Saved presets by their values (as JSON text), read only when some run trained with other
    values than the paper's: most lists of runs stay one statement."""
    if all(RunConfig.from_dict(c).augmentation == PAPER_AUGMENTATION for c in configs):
        return {}
    found: dict[str, str] = {}
    for preset in session.scalars(select(AugmentationPreset).order_by(AugmentationPreset.name)):
        found.setdefault(_augmentation_key(preset.params), preset.name)
    return found


def _augmentation_key(params: dict[str, Any]) -> str:
    return repr(sorted(AugmentParams.from_dict(params).to_dict().items()))


def _preset_of(config: RunConfig, saved: dict[str, str]) -> str | None:
    if config.augmentation == PAPER_AUGMENTATION:
        return PAPER_PRESET
    return saved.get(_augmentation_key(config.augmentation))


def rows_of(session: Session, found: Sequence[tuple[Run, int]]) -> list[RunRow]:
    """RunRows of (run, epochs done) pairs, each with its augmentation preset's name."""
    saved = _preset_names(session, [run.config for run, _ in found])
    return [_run_row(run, n, saved) for run, n in found]


def _run_row(run: Run, epochs_done: int, presets: dict[str, str] | None = None) -> RunRow:
    config, summary = RunConfig.from_dict(run.config), RunSummary.from_dict(run.summary)
    return RunRow(
        id=run.id,
        status=run.status.value,
        dataset=run.dataset.name,
        classes=tuple(run.dataset.classes),
        config=config,
        summary=summary,
        progress=RunProgress.from_dict(run.progress),
        protocol=_protocol(run, config, summary),
        grouped=None if run.split is None else run.split.grouped,
        experiment=run.experiment,
        fold=run.fold,
        split_id=run.split_id,
        seed=run.seed,
        weights_used=run.weights_used,
        device=run.device,
        created_at=run.created_at,
        created_by=run.created_by,
        started_at=run.started_at,
        finished_at=run.finished_at,
        epochs_done=epochs_done,
        cancel_requested=run.cancel_requested,
        name=run.name,
        notes=run.notes,
        augmentation_preset=_preset_of(config, presets or {}),
        groups_estimated=bool(run.dataset.groups_estimated),
    )


def _epoch_row(e: EpochMetric) -> EpochRow:
    return EpochRow(e.epoch, e.train_loss, e.train_accuracy, e.val_loss, e.val_accuracy, e.seconds, e.images_per_second)


def runs_query(*where: Any):
    """Runs with their dataset, split and number of recorded epochs: one statement, newest first."""
    epochs_done = (
        select(func.count(EpochMetric.id)).where(EpochMetric.run_id == Run.id).correlate(Run).scalar_subquery()
    )
    return (
        select(Run, epochs_done)
        .where(*where)
        .options(joinedload(Run.dataset), joinedload(Run.split))
        .order_by(Run.id.desc())
    )


def run_rows(session: Session, *, dataset: str | None = None, status: str | None = None) -> list[RunRow]:
    """Every run (of `dataset`, in `status`), newest first: the Runs table, Home, Predict, the CLI."""
    where = []
    if dataset is not None:
        where.append(Run.dataset_id == get_dataset(session, dataset).id)  # UserError naming the known ones
    if status is not None:
        where.append(Run.status == RunStatus(status))
    return rows_of(session, session.execute(runs_query(*where)).tuples().all())


def active_runs(session: Session) -> list[RunRow]:
    """Runs queued or running, oldest first (the order the worker takes them): the Train page's queue."""
    rows = session.execute(runs_query(Run.status.in_([RunStatus(s) for s in ACTIVE]))).tuples().all()
    return sorted(rows_of(session, rows), key=lambda r: r.id)


def last_launched_config(session: Session, user: str) -> RunConfig | None:
    """The settings of the run `user` launched last (the Train page starts from them in a new
    browser session); None when they have launched none, or only with settings this version no
    longer reads."""
    config = session.scalar(select(Run.config).where(Run.created_by == user).order_by(Run.id.desc()).limit(1))
    try:
        return None if config is None else RunConfig.from_dict(config)
    except UserError:  # a setting since removed or tightened: the form starts from its defaults instead
        return None


def best_honest_run(rows: list[RunRow]) -> RunRow | None:
    """The succeeded run with the best test accuracy under an honest protocol (split before
    augmenting). Runs whose split kept each specimen on one side come first: a split by image lets
    images of one specimen sit on both sides, which flatters the score."""
    honest = [
        r for r in rows if r.status == RunStatus.succeeded.value and not r.leaky and r.summary.test_accuracy is not None
    ]
    return max(honest, key=lambda r: (bool(r.grouped), r.summary.test_accuracy), default=None)


@dataclass(frozen=True)
class RunCurves:
    """A run and its epochs: the Runs page's live panel, and each run of the comparison."""

    run: RunRow
    epochs: tuple[EpochRow, ...]

    def remaining_seconds(self) -> float | None:
        """About how long training has left at the speed of the last few seconds of steps
        (RunProgress.step_seconds), so that a machine that gets busy shows in the figure within
        seconds; without it, from the epochs finished so far (the first, which includes compiling
        and warming up, left out once there are others). None until either is known. Validation
        between epochs and the final test come on top."""
        progress = self.run.progress
        if progress.step_seconds and progress.steps and progress.epoch:
            steps_left = (
                (self.run.config.epochs - progress.epoch) * progress.steps + progress.steps - (progress.step or 0)
            )
            return max(0.0, steps_left * progress.step_seconds)
        if not self.epochs:
            return None
        times = [e.seconds for e in self.epochs[1:]] or [self.epochs[0].seconds]
        per_epoch = sum(times) / len(times)
        progress, done = self.run.progress, len(self.epochs)
        into = (progress.step or 0) / progress.steps if progress.steps and (progress.epoch or 0) > done else 0.0
        return max(0.0, (self.run.config.epochs - done - into) * per_epoch)

    def speed_now(self) -> float | None:
        """Training images per second over the last few seconds of steps (None before two steps)."""
        seconds = self.run.progress.step_seconds
        return self.run.config.batch_size / seconds if seconds else None

    def slowed_to(self) -> float | None:
        """The speed now as a share of the finished epochs' (the first left out once there are
        others), when it has fallen below two thirds of it: the machine got busier. None otherwise."""
        now = self.speed_now()
        earlier = [e.images_per_second for e in (self.epochs[1:] or self.epochs) if e.images_per_second]
        if now is None or not earlier:
            return None
        share = now / (sum(earlier) / len(earlier))
        return share if share < 2 / 3 else None


def run_row(session: Session, run_id: int) -> RunRow:
    found = session.execute(runs_query(Run.id == run_id)).tuples().all()
    if not found:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    return rows_of(session, found)[0]


def run_curves(session: Session, run_ids: list[int]) -> list[RunCurves]:
    """The runs `run_ids` (in that order; unknown ids left out) with their epochs."""
    query = (
        select(Run)
        .where(Run.id.in_(run_ids))
        .options(joinedload(Run.dataset), joinedload(Run.split), joinedload(Run.epochs))
    )
    found = {run.id: run for run in session.scalars(query).unique()}
    ordered = [run for run in (found.get(i) for i in run_ids) if run is not None]
    rows = rows_of(session, [(run, len(run.epochs)) for run in ordered])
    return [RunCurves(row, tuple(_epoch_row(e) for e in run.epochs)) for row, run in zip(rows, ordered)]


def run_curve(session: Session, run_id: int) -> RunCurves:
    found = run_curves(session, [run_id])
    if not found:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    return found[0]
