"""Reproduce the paper's number, and show what it measures: one report, two protocols, one model.

  paper's protocol  augment every image, then split the augmented copies 80/20 (Hasan et al.):
                    copies of each test image, and images of its specimen, are in training
  honest protocol   split the source images first (by specimen group when the dataset has groups),
                    augment only the training part, test on untouched images

Both runs use the same model, augmentation, optimiser, epochs, image size and seed; only the
protocol differs, so the gap between the two accuracies is what the leak adds. The report
(Markdown with PNG figures) holds both Table I layouts, the confusion matrices and training
curves, bootstrap intervals, a leak audit of the honest split and a plain-language verdict.

The two runs and the report's facts are read here; the report's words, figures and its table of the
paper's settings (core/paper.py) are core/jobs/reproduce_report.py's.

    python -m core reproduce-paper DATASET --out report-folder
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.access.accounts import User
from core.config import Settings
from core.errors import UserError
from core.jobs.reproduce_report import ProtocolResult, ReportFacts, write_files
from core.progress import StageCallback
from core.store.db import Run
from core.store.records import RunSummary
from core.training.run_config import RunConfig

log = logging.getLogger(__name__)


def _run_one(
    Session: sessionmaker,
    settings: Settings,
    config: RunConfig,
    label: str,
    progress: StageCallback | None,
    user: User,
) -> int:
    from core.jobs import execute, runs

    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, config, user=user)
        run_id = run.id
    log.info("reproduce: %s protocol, run %d", label, run_id)
    cb = (lambda stage, done, total: progress(f"{label}: {stage}", done, total)) if progress else None
    execute.execute_run(Session, settings, run_id, progress=cb)
    return run_id


def _collect(session: Session, run: Run, key: str, title: str) -> ProtocolResult:
    from core.evaluation import metrics
    from core.evaluation.calibration import bootstrap_metrics
    from core.store.db import Image, Prediction, RunStatus

    if run.status != RunStatus.succeeded:
        raise UserError(f"Run {run.id} has not succeeded (status: {run.status.value}); nothing to report.")
    report = metrics.run_report(session, run)
    rows = session.execute(
        select(Prediction.true_label, Prediction.predicted_label, Prediction.image_id, Image.group)
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run.id)
        .order_by(Prediction.id)
    ).all()
    # Resample whole units: the source image of augmented copies (paper protocol), the specimen
    # group of a grouped split; images of one unit are not independent test samples.
    units = [g if run.split.grouped and g is not None else image_id for _, _, image_id, g in rows]
    boot = bootstrap_metrics(
        [r[0] for r in rows], [r[1] for r in rows], run.dataset.classes, groups=units, n_resamples=1000, seed=run.seed
    )
    epochs = [
        {
            "epoch": e.epoch,
            "train_loss": e.train_loss,
            "train_accuracy": e.train_accuracy,
            "val_loss": e.val_loss,
            "val_accuracy": e.val_accuracy,
        }
        for e in run.epochs
    ]
    seconds = (run.finished_at - run.started_at).total_seconds() if run.finished_at and run.started_at else float("nan")
    return ProtocolResult(
        key=key,
        title=title,
        run_id=run.id,
        protocol=report.protocol,
        accuracy=report.accuracy,
        table=metrics.format_report(report),
        confusion=report.confusion,
        classes=list(report.classes),
        epochs=epochs,
        summary=RunSummary.from_dict(run.summary),
        weights_used=run.weights_used or "",
        device=run.device or "",
        seconds=seconds,
        bootstrap=boot,
        n_source_images=len({r[2] for r in rows}),
    )


# ---------------------------------------------------------------------------------------------
# The two runs and the report


def reproduce_paper(
    Session: sessionmaker,
    settings: Settings,
    dataset: str,
    base: RunConfig,
    out_dir: Path,
    progress: StageCallback | None = None,
    *,
    user: User,
) -> Path:
    """Train the paper's model under the paper's protocol and under the honest one, then write
    out_dir/report.md (and its PNG figures). Returns the report's path.

    Args:
        Session: sessionmaker of the app database (runs are recorded like any other).
        settings: app settings.
        dataset: name of an ingested dataset; with groups, the honest split is grouped.
        base: model and training settings shared by both runs (its dataset, split, grouped and
            fold are replaced).
        out_dir: folder for report.md and the figures; made if missing.
        progress: optional (stage, done, total) callback; stages are prefixed with the protocol.
        user: who launches the two runs (an editor).
    """
    from core.data.datasets import get_dataset
    from core.training.model import check_weights

    check_weights(base.weights)  # fail before anything is recorded or trained
    with Session() as s:
        get_dataset(s, dataset)
    leaky_id = _run_one(
        Session,
        settings,
        base.replace(dataset=dataset, split="paper-leaky", grouped=None, fold=0),
        "paper-leaky",
        progress,
        user,
    )
    honest_id = _run_one(
        Session,
        settings,
        base.replace(dataset=dataset, split="holdout", grouped=None, fold=0),
        "honest",
        progress,
        user,
    )
    if progress:
        progress("report", 0, 1)
    path = write_report(Session, settings, leaky_id, honest_id, out_dir)
    if progress:
        progress("report", 1, 1)
    return path


def write_report(
    Session: sessionmaker, settings: Settings, leaky_run_id: int, honest_run_id: int, out_dir: Path
) -> Path:
    """Write out_dir/report.md and its figures from two finished runs: one with the paper-leaky
    split and one honest (holdout) run with the same settings. Returns the report's path."""
    from core.data import audit, splits

    out_dir = Path(out_dir)
    with Session.begin() as s:
        leaky_run, honest_run = s.get(Run, leaky_run_id), s.get(Run, honest_run_id)
        if leaky_run is None or honest_run is None:
            raise UserError(f"No run {leaky_run_id if leaky_run is None else honest_run_id}.")
        if leaky_run.split.protocol != "paper-leaky" or honest_run.split.protocol != "holdout":
            raise UserError("write_report needs a paper-leaky run and a holdout run.")
        ds = honest_run.dataset
        dataset, classes = ds.name, list(ds.classes)
        counts = {c: sum(im.label == c for im in ds.images) for c in classes}
        n_groups = len({im.group for im in ds.images if im.group is not None})
        config = RunConfig.from_dict(honest_run.config)
        grouped = honest_run.split.grouped
        leaky = _collect(s, leaky_run, "paper-leaky", "The paper's protocol (LEAKY)")
        honest = _collect(s, honest_run, "honest", "The honest protocol")
        honest_audit = audit.audit_split(s, settings, honest_run.split, 0, image_size=config.image_size)
        by_image_audit = None
        if grouped:
            # For comparison only (no training): the same data split by image instead of by group.
            by_image = splits.make_split(
                s,
                ds,
                protocol="holdout",
                seed=config.seed,
                test_fraction=config.test_fraction,
                val_fraction=config.val_fraction,
                grouped=False,
            )
            by_image_audit = audit.audit_split(s, settings, by_image, 0, image_size=config.image_size)
        test_labels = [im.label for im in splits.split_parts(s, honest_run.split, 0).get("test", [])]
    chance = max(test_labels.count(c) for c in classes) / len(test_labels) if test_labels else float("nan")

    facts = ReportFacts(dataset, counts, n_groups, config, grouped, chance, leaky, honest, honest_audit, by_image_audit)
    return write_files(out_dir, facts)
