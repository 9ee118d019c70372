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
import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session, joinedload, selectinload, sessionmaker

from core.access.accounts import User
from core.config import Settings
from core.data import splits
from core.data.datasets import get_dataset, load_rgb
from core.errors import UserError
from core.evaluation import calibration, compare, metrics, yardstick
from core.evaluation.compare import PairedComparison
from core.inference import approval, prediction_log
from core.jobs import manage, worker
from core.store.db import (
    AugmentationPreset, Dataset, EpochMetric, FailuresSeen, Image, Prediction, Run, RunStatus, make_sessionmaker,
    utcnow,
)
from core.store.records import RunProgress, RunSummary
from core.store.runs import model_path, run_dir
from core.training.presets import PAPER_PRESET
from core.training.run_config import RunConfig, settings_fields
from core.transforms.augment import AugmentParams

# A run's status as the pages see it: the RunStatus values, as plain text.
STATUSES = tuple(s.value for s in RunStatus)
ACTIVE = (RunStatus.queued.value, RunStatus.running.value)  # queued or running: the pages poll it


def sessions(database_url: str) -> sessionmaker:
    """The sessions the pages open to call views and core's actions (one sessionmaker per process)."""
    return make_sessionmaker(database_url)


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def setting_words(config: RunConfig, augmentation_preset: str | None = PAPER_PRESET, fold: int = 0) -> list[str]:
    """Its protocol, then each setting that differs from the paper's, most telling first, in a few words."""
    split = {"holdout": "holdout", "paper-leaky": "the paper's leaky split"}.get(
        config.split, f"k-fold {fold + 1}/{config.folds}")
    checks = [
        (config.image_size != PAPER.image_size, f"{config.image_size} px"),
        (config.epochs != PAPER.epochs, _plural(config.epochs, "epoch")),
        (config.patience != PAPER.patience, f"early stopping after {_plural(config.patience, 'flat epoch')}"),
        (config.augmentation != PAPER.augmentation, augmentation_preset or "custom augmentation"),
        (config.stain_normalisation != PAPER.stain_normalisation, f"{config.stain_normalisation} stain normalisation"),
        (config.hed_jitter != PAPER.hed_jitter, f"HED jitter {config.hed_jitter:g}"),
        (config.tiles != PAPER.tiles, _plural(config.tiles, "tile")),
        (config.tta != PAPER.tta, "test-time flips"),
        (config.weights != PAPER.weights, "random start" if config.weights == "none" else "own weights file"),
        (config.per_class != PAPER.per_class, f"{config.per_class} per class"),
        (config.batch_size != PAPER.batch_size, f"batch {config.batch_size}"),
        (config.lr != PAPER.lr, f"learning rate {config.lr:g}"),
        (config.test_fraction != PAPER.test_fraction and config.split != "kfold", f"test {config.test_fraction:.0%}"),
        (config.val_fraction != PAPER.val_fraction,
         f"validation {config.val_fraction:.0%}" if config.val_fraction else "no validation"),
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


def _rows(session: Session, found: Sequence[tuple[Run, int]]) -> list[RunRow]:
    """RunRows of (run, epochs done) pairs, each with its augmentation preset's name."""
    saved = _preset_names(session, [run.config for run, _ in found])
    return [_run_row(run, n, saved) for run, n in found]


def _run_row(run: Run, epochs_done: int, presets: dict[str, str] | None = None) -> RunRow:
    config, summary = RunConfig.from_dict(run.config), RunSummary.from_dict(run.summary)
    return RunRow(
        id=run.id, status=run.status.value, dataset=run.dataset.name, classes=tuple(run.dataset.classes),
        config=config, summary=summary, progress=RunProgress.from_dict(run.progress),
        protocol=_protocol(run, config, summary), grouped=None if run.split is None else run.split.grouped,
        experiment=run.experiment, fold=run.fold, split_id=run.split_id, seed=run.seed,
        weights_used=run.weights_used, device=run.device, created_at=run.created_at, created_by=run.created_by,
        started_at=run.started_at, finished_at=run.finished_at, epochs_done=epochs_done,
        cancel_requested=run.cancel_requested, name=run.name, notes=run.notes,
        augmentation_preset=_preset_of(config, presets or {}), groups_estimated=bool(run.dataset.groups_estimated),
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
    return _rows(session, session.execute(_runs_query(*where)).tuples().all())


def active_runs(session: Session) -> list[RunRow]:
    """Runs queued or running, oldest first (the order the worker takes them): the Train page's queue."""
    rows = session.execute(_runs_query(Run.status.in_([RunStatus(s) for s in ACTIVE]))).tuples().all()
    return sorted(_rows(session, rows), key=lambda r: r.id)


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
    honest = [r for r in rows if r.status == RunStatus.succeeded.value and not r.leaky
              and r.summary.test_accuracy is not None]
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
            steps_left = (self.run.config.epochs - progress.epoch) * progress.steps + progress.steps - (progress.step or 0)
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


def duration_text(seconds: float) -> str:
    """A stretch of time in words: '40 s', '3 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_row(session: Session, run_id: int) -> RunRow:
    found = session.execute(_runs_query(Run.id == run_id)).tuples().all()
    if not found:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    return _rows(session, found)[0]


def run_curves(session: Session, run_ids: list[int]) -> list[RunCurves]:
    """The runs `run_ids` (in that order; unknown ids left out) with their epochs."""
    query = (select(Run).where(Run.id.in_(run_ids))
             .options(joinedload(Run.dataset), joinedload(Run.split), joinedload(Run.epochs)))
    found = {run.id: run for run in session.scalars(query).unique()}
    ordered = [run for run in (found.get(i) for i in run_ids) if run is not None]
    rows = _rows(session, [(run, len(run.epochs)) for run in ordered])
    return [RunCurves(row, tuple(_epoch_row(e) for e in run.epochs)) for row, run in zip(rows, ordered)]


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
    uncertainty: dict[str, Any] | None = None  # metrics.run_uncertainty
    yardstick: str | None = None
    folds: FoldResults | None = None
    predictions: tuple[PredictionRow, ...] = ()

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


@dataclass(frozen=True)
class CalibrationView:
    """A run's calibration record (core/evaluation/calibration.py run_calibration) in the pages'
    words: 'confidence scaling' for the temperature, 'calibration error' for the ECE; the technical
    terms go in the tooltips."""

    scaling: float | None  # the temperature; None: not calibrated
    note: str  # why not, when not
    n_val: int | None
    val_error: tuple[float, float] | None  # before -> after scaling
    test_error: tuple[float, float] | None
    refer_sentence: str
    val_loss: tuple[float, float] | None = None  # the log-loss the scaling was fitted to lower: before -> after

    @property
    def scaling_sentence(self) -> str:
        """What the scaling did and what it was fitted on, in words; why the binned error can rise."""
        text = (f"Confidences {calibration.scaling_words(self.scaling)}. Fitted on the {self.n_val} validation images "
                "to lower their log-loss (how surprised the model is by the right answers)")
        if self.val_loss is not None:
            text += f": {self.val_loss[0]:.3f} → {self.val_loss[1]:.3f}"
        text += "."
        if self.val_error is not None and self.val_error[1] > self.val_error[0]:
            text += (" The calibration error on the same images rose a little: it is another yardstick (confidence "
                     f"against accuracy in {calibration.N_BINS} bins), coarse with {self.n_val} images, and the scaling "
                     "did not aim at it.")
        return text

    @property
    def scaling_help(self) -> str:
        return (f"Temperature scaling: the model's scores (logits) are divided by T = {self.scaling:.3g}, fitted on "
                f"the {self.n_val} validation images so that a confidence of 80% is right about 80% of the time. "
                "Above 1 the model was over-confident and its confidences are toned down; below 1 they are raised.")

    @property
    def error_help(self) -> str:
        return ("Expected calibration error (ECE): the average gap between the confidence of a prediction and how "
                "often such predictions are right, over confidence bins; 0 is perfect. As trained → after "
                "confidence scaling.")

    @staticmethod
    def error_text(errors: tuple[float, float] | None) -> str:
        return "–" if errors is None else f"{errors[0]:.3f} → {errors[1]:.3f}"


def calibration_view(summary: RunSummary) -> CalibrationView:
    record = summary.calibration or {}
    if record.get("temperature") is None:
        return CalibrationView(None, record.get("note", "the run was recorded before calibration was added"),
                               None, None, None, "")
    test = (record["test_ece_before"], record["test_ece_after"]) if "test_ece_before" in record else None
    band = calibration.recorded_band(record)
    refer = calibration.band_sentence(band)
    if band.threshold is not None and record.get("refer_confidence") is not None \
            and record.get("test_coverage") is not None:  # measured with this very band
        accepted = record.get("test_accepted_accuracy")
        refer += (f" On the test part it keeps {record['test_coverage']:.0%} of the images as confident"
                  + ("" if accepted is None else f", {accepted:.1%} of them right") + ".")
    loss = (record["val_nll_before"], record["val_nll_after"]) if "val_nll_before" in record else None
    return CalibrationView(record["temperature"], "", record.get("n_val"),
                           (record["val_ece_before"], record["val_ece_after"]), test, refer, loss)


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


def run_results(session: Session, settings: Settings, run_id: int) -> RunResults:
    """The results of a run: error and log, leak audit, and for a succeeded run its report,
    intervals, k-fold summary and predictions."""
    run = session.scalar(select(Run).where(Run.id == run_id)
                         .options(joinedload(Run.dataset), joinedload(Run.split)))
    if run is None:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    row = _rows(session, [(run, 0)])[0]
    folder = run_dir(settings, run_id)
    log = run.log_tail
    if not log and (folder / "train.log").exists():
        log = "\n".join((folder / "train.log").read_text(errors="replace").splitlines()[-60:])
    model = model_path(settings, run_id)
    base = RunResults(row, run.error, log, model if model.exists() else None, dict(run.timings or {}),
                      dict(run.config), dict(run.summary or {}), manage.resumable(settings, run_id))
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

    def source_for(self, import_roots: Sequence[Path], full: bool) -> str:
        """Where its images came from, as a user may read it: in full for an editor (`full`); else a
        folder on the server by its path below the import root it lies in (IMPORT_ROOTS), or by its
        own name. An upload is named by its file(s) already."""
        if full or not self.source.startswith("/"):
            return self.source
        source = Path(self.source)
        root = next((r for r in import_roots if source.is_relative_to(r)), None)
        if root is not None and source != root:
            return source.relative_to(root).as_posix()
        return source.name

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
    running: tuple[int, ...]  # the runs it trains now (the runs table's record: claimed by it, running)
    host: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class TrainingNow:
    """A run that is running, as the runs table records it (the queue's own record)."""

    run_id: int
    started_at: datetime | None
    owner: str | None  # the worker (host:pid) or command-line process that claimed it


@dataclass(frozen=True)
class WorkerPanel:
    alive: bool
    queued: int
    workers: tuple[WorkerRow, ...]
    running: tuple[TrainingNow, ...] = ()  # every run running, whoever trains it

    @property
    def busy(self) -> bool:
        """Runs wait or train: the panel is worth refreshing."""
        return bool(self.queued or self.running)

    def state(self, now: datetime | None = None) -> str:
        """What training is doing, in a few words: 'running run 3 (started 3 min ago)',
        'waiting for runs' or 'not running'."""
        now = now or utcnow()
        if self.running:
            return "running " + ", ".join(
                f"run {r.run_id}" + (f" (started {duration_text((now - r.started_at).total_seconds())} ago)"
                                     if r.started_at else "") for r in self.running)
        return "waiting for runs" if self.alive else "not running"

    def details(self) -> str:
        """The processes behind `state`, for a tooltip: each worker's host, pid, device and heartbeat."""
        lines = [f"Worker on {w.host or w.id} (process {w.pid or '?'}), {w.device or 'device reported with its first run'}, "
                 f"heartbeat {w.heartbeat_age:.0f} s ago" for w in self.workers]
        owned = {r for w in self.workers for r in w.running}
        lines += [f"Run {r.run_id} is held by {r.owner or 'a process'}, not a live worker: a run started from the "
                  "command line, or one whose worker stopped (the queue takes it back once its heartbeat is stale)"
                  for r in self.running if r.run_id not in owned]
        return "\n\n".join(lines) or "No worker process is alive; the app starts one when a page loads."


def worker_panel(session: Session, settings: Settings) -> WorkerPanel:
    """Live workers, the runs running and how many wait: the sidebar and Home. What runs is read
    from the runs table, the record the queue itself keeps (a worker's own list of runs lags until
    its next heartbeat), so the sidebar and the Train page's queue always agree."""
    status = worker.worker_status(session, settings)
    running = tuple(TrainingNow(run_id, started, owner) for run_id, started, owner in session.execute(
        select(Run.id, Run.started_at, Run.worker).where(Run.status == RunStatus.running).order_by(Run.id)))
    workers = tuple(WorkerRow(w["id"], w["device"], w["heartbeat_age"],
                              tuple(r.run_id for r in running if r.owner == w["id"]), w["host"], w["pid"])
                    for w in status["workers"])
    return WorkerPanel(bool(status["alive"]), int(status["queued"]), workers, running)


# ---------------------------------------------------------------------------------------------
# Failures the user has not seen yet

NOTICE_HOURS = 24  # a user who has never dismissed a failure is told of those of the last day


@dataclass(frozen=True)
class FailureNotice:
    run_id: int
    title: str  # RunRow.title
    finished_at: datetime
    message: str  # failure_message


def failure_notices(session: Session, user: str) -> tuple[FailureNotice, ...]:
    """Runs that failed since `user` last dismissed the failures (manage.mark_failures_seen), newest
    first: the sidebar's and the Runs page's notice."""
    seen = session.scalar(select(FailuresSeen.seen_until).where(FailuresSeen.user == user))
    since = seen or utcnow() - timedelta(hours=NOTICE_HOURS)
    found = session.execute(_runs_query(Run.status == RunStatus.failed, Run.finished_at > since)).tuples().all()
    rows = _rows(session, found)
    notices = [FailureNotice(row.id, row.title, run.finished_at,
                             failure_message(run.error, row.summary) or "No error was recorded.")
               for row, (run, _) in zip(rows, found)]
    return tuple(sorted(notices, key=lambda n: n.finished_at, reverse=True))


# ---------------------------------------------------------------------------------------------
# Comparing runs


@dataclass(frozen=True)
class SettingDifference:
    """One setting that differs between the runs compared, and its value in each."""

    setting: str
    help: str
    values: tuple[str, ...]  # in the order of the runs


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "when the dataset has specimen groups"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_differences(rows: Sequence[RunRow]) -> list[SettingDifference]:
    """The settings in which `rows` differ (each augmentation value apart), side by side; empty
    when they were trained alike."""
    table: list[tuple[str, str, list[str]]] = [
        ("Dataset", "", [r.dataset for r in rows]),
        ("Protocol", "how the images were split before training", [r.protocol for r in rows]),
        ("Augmentation preset", "the preset whose values it trained with", [r.augmentation for r in rows]),
    ]
    for f in settings_fields():
        if f.name in ("dataset", "augmentation", "grouped"):
            continue  # shown above, by name
        values = [r.weights if f.name == "weights" else _value_text(getattr(r.config, f.name)) for r in rows]
        table.append((f.metadata.get("label", f.name), f.metadata.get("help", ""), values))
    table.append(("Fold", "which fold of its k-fold experiment", [str(r.fold + 1) for r in rows]))
    for key in PAPER_AUGMENTATION:
        table.append((f"Augmentation: {key.replace('_', ' ')}", "a value of the augmentation preset",
                      [_value_text(r.config.augment_params.to_dict()[key]) for r in rows]))
    return [SettingDifference(name, help_, tuple(values)) for name, help_, values in table if len(set(values)) > 1]


# ---------------------------------------------------------------------------------------------
# Approved models and the log of predictions


@dataclass(frozen=True)
class ApprovalPanel:
    """The approved model of each class set and every approval made: the Runs page."""

    current: tuple[approval.ApprovalRecord, ...]  # in force, newest first
    history: tuple[approval.ApprovalRecord, ...]  # all, newest first

    @property
    def approved_run_ids(self) -> dict[tuple[str, ...], int]:
        """Class set (sorted names) -> the approved run, for the class sets whose run still exists."""
        return {a.classes: a.run_id for a in self.current if a.run_id is not None}

    def of_run(self, run_id: int) -> approval.ApprovalRecord | None:
        """The approval in force of run `run_id`, when it is approved."""
        return next((a for a in self.current if a.run_id == run_id), None)

    @property
    def default(self) -> approval.ApprovalRecord | None:
        """The approval a classification without a named run uses (service.resolve_run)."""
        return self.current[0] if self.current else None


def approval_panel(session: Session) -> ApprovalPanel:
    history = tuple(approval.approval_history(session))
    return ApprovalPanel(tuple(a for a in history if a.current), history)


@dataclass(frozen=True)
class PredictionHistory:
    """Logged predictions under the chosen filters, and the values the filters offer: the Predict
    page's History tab."""

    rows: tuple[prediction_log.LoggedPrediction, ...]  # newest first
    limit: int | None
    choices: prediction_log.LogValues

    @property
    def truncated(self) -> bool:
        """Whether more rows match than are shown."""
        return self.limit is not None and len(self.rows) >= self.limit

    @property
    def classes(self) -> tuple[str, ...]:
        """Every class any shown row has a probability for (the table's probability columns)."""
        return tuple(sorted({c for r in self.rows for c in r.probabilities}))

    def csv(self) -> str:
        return prediction_log.to_csv(self.rows)


def prediction_history(session: Session, *, reader: User | None, since: datetime | None = None,
                       until: datetime | None = None, run_id: int | None = None, user: str | None = None,
                       predicted: str | None = None,
                       limit: int | None = prediction_log.DEFAULT_LIMIT) -> PredictionHistory:
    """The rows and filter values that `reader` may read (a viewer: their own; prediction_log.readable_user)."""
    rows = prediction_log.list_predictions(session, since=since, until=until, run_id=run_id, user=user,
                                           predicted=predicted, limit=limit, reader=reader)
    return PredictionHistory(tuple(rows), limit, prediction_log.logged_values(session, reader))


# ---------------------------------------------------------------------------------------------
# Home: the best result on unseen specimens, and what this machine can train on


@dataclass(frozen=True)
class BestGrouped:
    """Home's headline: the best finished run on a split grouped by specimen, beside the
    colour-only yardstick on that same split; or, when there is none, the best split by image."""

    run: RunRow | None  # None: no succeeded run on a split grouped by specimen
    ungrouped: RunRow | None  # without a grouped run: the best honest one split by image, if any

    @property
    def accuracy(self) -> float | None:
        return None if self.run is None else self.run.summary.test_accuracy

    @property
    def yardstick(self) -> float | None:
        """Colour alone on the same split (None: not recorded for this run)."""
        return None if self.run is None else yardstick.accuracy_of(self.run.summary.colour_yardstick)

    def explanation(self, versus_colour: PairedComparison | None = None) -> str:
        """Plain words on what the number means; `versus_colour`: the run against colour alone on the
        same test images (core/jobs/comparisons.py), which decides whether the network "does better"."""
        if self.run is None:
            text = ("No finished run on a split grouped by specimen yet, so there is no honest estimate for "
                    "new patients. Give the dataset specimen groups on the Datasets page and train with the "
                    "split grouped.")
            if self.ungrouped is not None:
                text += (f" The best run split by image (run {self.ungrouped.id}) scored "
                         f"{self.ungrouped.summary.test_accuracy:.1%}, but such a split can put images of one "
                         "specimen on both sides, which flatters the score.")
            return text
        fold = f", fold {self.run.fold + 1} of {self.run.config.folds}" if self.run.config.split == "kfold" else ""
        head = f"Run {self.run.id} ({self.run.protocol}{fold}): this run {self.accuracy:.1%}"
        if self.run.groups_estimated:
            head += (" on estimated specimens (groups cut from blocks of file numbers, not real specimen ids, so "
                     "images of one specimen may still sit on both sides)")
        if self.yardstick is None:
            return head + "; colour alone was not measured on its split."
        head += f"; colour alone on the same split: {self.yardstick:.1%}. "
        colour = ("'Colour alone' is a simple model that sees only the stain colours of each image (their "
                  "averages and spreads), not the tissue. ")
        if versus_colour is None:
            return head + colour + ("This run did not record colour alone image by image, so whether the gap is more "
                                    "than chance cannot be said; train it again to see.")
        said = versus_colour.verdict("The network", "colour alone")
        if versus_colour.within_noise:
            return head + colour + said + (" So the network may rely on the stain of each class's slides rather "
                                           "than the disease, and may not carry over to another laboratory's slides.")
        if versus_colour.difference < 0:
            return head + colour + said + " The network has learnt less than the stain alone tells."
        return head + colour + said + " So it uses more than the stain."


def best_grouped(rows: list[RunRow]) -> BestGrouped:
    """The succeeded run with the best test accuracy on a split grouped by specimen; without one,
    the best honest run split by image (never the paper's leaky protocol)."""
    finished = [r for r in rows if r.status == RunStatus.succeeded.value and not r.leaky
                and r.summary.test_accuracy is not None]
    grouped = [r for r in finished if r.grouped]
    best = max(grouped, key=lambda r: r.summary.test_accuracy, default=None)
    fallback = None if best else max(finished, key=lambda r: r.summary.test_accuracy, default=None)
    return BestGrouped(best, fallback)


# Reference speeds for the paper's 224 px training (bench/RESULTS.md): one H100, eager fp32 at
# batch 24, about 180 images/s (design notes); 2 idle CPU cores, forward and backward, about 4.4
# images/s, i.e. 2.2 per core. Only the order of magnitude is meant.
GPU_IMAGES_PER_SECOND = 180.0
CPU_IMAGES_PER_SECOND_PER_CORE = 2.2


@dataclass(frozen=True)
class MachineSummary:
    """What this server has to train on."""

    gpus: tuple[str, ...]  # the CUDA devices torch sees, by name
    cpu_cores: int

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def paper_hours(self) -> float:
        """About how long the paper's settings (RunConfig's defaults, three classes) train here."""
        paper = RunConfig(dataset="-")
        images = paper.per_class * 3 * paper.epochs
        # One GPU: a run trains on one unless it is started across several (core/training/distributed.py).
        speed = GPU_IMAGES_PER_SECOND if self.gpus else CPU_IMAGES_PER_SECOND_PER_CORE * self.cpu_cores
        return images / speed / 3600

    def sentence(self) -> str:
        hours, paper_run = self.paper_hours(), RunConfig(dataset="-")
        settings = f"{paper_run.image_size} px, {paper_run.epochs} epochs"
        paper = f"about {hours:.0f} hours" if hours >= 1.5 else f"about {max(1, round(hours * 60))} minutes"
        if self.has_gpu:
            names = ", ".join(sorted(set(self.gpus)))
            return (f"GPU on this server: {len(self.gpus)} × {names}. Training runs on it; the paper's settings "
                    f"({settings}) take {paper}.")
        slower = GPU_IMAGES_PER_SECOND / (CPU_IMAGES_PER_SECOND_PER_CORE * self.cpu_cores)
        slower = round(slower, -1) if slower >= 15 else round(slower)
        return (f"No GPU on this server: training runs on the CPU ({self.cpu_cores} cores), about {slower:.0f}× "
                "slower than on one GPU. The CPU training preset (64 px) takes minutes per fold; the paper's "
                f"settings ({settings}) take {paper} here.")


@functools.cache
def machine_summary() -> MachineSummary:
    """This server's GPUs and CPU cores, once per process. Imports torch (only here, when called),
    so opening a page that shows it does not load torch as the page is imported."""
    import torch

    gpus = ()
    if torch.cuda.is_available():
        gpus = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return MachineSummary(gpus, cores)


# ---------------------------------------------------------------------------------------------
# Augmentation: the preview's source image


def preview_image(image: ImageRow, size: int) -> PILImage.Image:
    """The stored image at the training size with its proportions kept (its shorter side `size`
    pixels, e.g. 417x312 -> 299x224), for the Augmentation page's preview. Training squeezes each
    image to a size x size square; the preview keeps the tissue's shape so its changes can be judged."""
    original = load_rgb(image.path)
    w, h = original.size
    scale = size / min(w, h)
    return original.resize((max(1, round(w * scale)), max(1, round(h * scale))), PILImage.Resampling.LANCZOS)
