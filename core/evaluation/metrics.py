"""Metrics: overall accuracy, the paper's per-class table (Table I), confusion matrix, k-fold summary.

Per-class accuracy is one-vs-rest: (TP + TN) / N for that class, as in a binary view of each class.
Precision, recall and F1 are the usual per-class values; support is the class's number of test samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import UserError
from core.store.db import Image, Prediction, Run
from core.store.records import RunSummary

if TYPE_CHECKING:  # for the annotations; run_uncertainty imports the module where it uses it
    from core.evaluation.calibration import BootstrapResult, ReliabilityBins


@dataclass
class ClassRow:
    name: str
    accuracy: float
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Report:
    classes: list[str]
    accuracy: float
    rows: list[ClassRow]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    n: int
    protocol: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def report_from_labels(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> Report:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(classes)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    n = int(cm.sum())
    rows = []
    for k, name in enumerate(classes):
        tp = cm[k, k]
        tn = n - cm[k, :].sum() - cm[:, k].sum() + tp
        rows.append(
            ClassRow(
                name,
                float((tp + tn) / n) if n else 0.0,
                float(precision[k]),
                float(recall[k]),
                float(f1[k]),
                int(support[k]),
            )
        )
    accuracy = float(np.trace(cm) / n) if n else 0.0
    return Report(list(classes), accuracy, rows, cm, n)


def run_report(session: Session, run: Run) -> Report:
    """The test report of a finished run, from its stored predictions."""
    preds = session.scalars(select(Prediction).where(Prediction.run_id == run.id)).all()
    if not preds:
        raise UserError(f"Run {run.id} has no test predictions (status: {run.status.value}).")
    report = report_from_labels([p.true_label for p in preds], [p.predicted_label for p in preds], run.dataset.classes)
    report.protocol = RunSummary.from_dict(run.summary).protocol or ""
    return report


def resampled_groups(preds: Sequence, groups: Sequence[str | None]) -> list | None:
    """What a bootstrap of test predictions resamples whole: the source image of augmented copies
    (the paper's protocol), else each image's specimen group when every image has one; None: images."""
    if any(p.aug_index is not None for p in preds):
        return [p.image_id for p in preds]
    return None if any(g is None for g in groups) else list(groups)


@dataclass(frozen=True)
class RunUncertainty:
    """A finished run's test figures with their uncertainty (run_uncertainty)."""

    bootstrap: BootstrapResult  # intervals of accuracy and the per-class figures
    reliability: ReliabilityBins | None  # test confidence against accuracy; None: the run has no calibration
    reliability_after: ReliabilityBins | None  # the same after the run's temperature scaling


def run_uncertainty(session: Session, run: Run) -> RunUncertainty:
    """Bootstrap intervals of a finished run's test figures, and its test reliability before and
    after the run's temperature scaling (None when it has no calibration).

    Test samples of one specimen (or, in the leaky protocol, copies of one source image) are not
    independent, so whole groups are resampled where groups are known.
    """
    from core.evaluation import calibration

    rows = session.execute(
        select(Prediction, Image.group)
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run.id)
        .order_by(Prediction.id)
    ).all()
    if not rows:
        raise UserError(f"Run {run.id} has no test predictions (status: {run.status.value}).")
    preds = [p for p, _ in rows]
    groups = resampled_groups(preds, [g for _, g in rows])
    labels = [p.true_label for p in preds]
    boot = calibration.bootstrap_metrics(
        labels, [p.predicted_label for p in preds], run.dataset.classes, groups=groups, seed=run.seed
    )
    temperature = RunSummary.from_dict(run.summary).temperature
    if temperature is None:
        return RunUncertainty(boot, None, None)
    probs = np.asarray([p.probabilities for p in preds], dtype=np.float64)
    return RunUncertainty(
        boot,
        calibration.reliability_bins(probs, labels),
        calibration.reliability_bins(calibration.calibrate(probs, temperature), labels),
    )


@dataclass
class FoldSummary:
    n_folds: int
    accuracy_mean: float
    accuracy_std: float
    rows: list[dict[str, float | str]]  # per class: name, {metric}_mean, {metric}_std


def summarise_folds(reports: Sequence[Report]) -> FoldSummary:
    """Mean and sample standard deviation across k-fold reports (one per fold)."""
    if not reports:
        raise UserError("No fold reports to summarise.")
    acc = np.array([r.accuracy for r in reports])
    ddof = 1 if len(reports) > 1 else 0
    rows = []
    for k, name in enumerate(reports[0].classes):
        row: dict[str, float | str] = {"name": name}
        for metric in ("accuracy", "precision", "recall", "f1", "support"):
            values = np.array([getattr(r.rows[k], metric) for r in reports], dtype=float)
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=ddof))
        rows.append(row)
    return FoldSummary(len(reports), float(acc.mean()), float(acc.std(ddof=ddof)), rows)


def format_report(report: Report) -> str:
    """Table I layout, then the confusion matrix, as plain text."""
    width = max(8, *(len(c) for c in report.classes))
    lines = []
    if report.protocol:
        lines.append(f"Protocol: {report.protocol}")
    lines.append(f"Overall accuracy: {report.accuracy:.4f} ({report.n} test samples)")
    lines.append("")
    lines.append(f"{'Class':<{width}}  {'Accuracy':>8}  {'Precision':>9}  {'Recall':>6}  {'F1':>6}  {'Support':>7}")
    for r in report.rows:
        lines.append(
            f"{r.name:<{width}}  {r.accuracy:>8.4f}  {r.precision:>9.4f}  {r.recall:>6.4f}  {r.f1:>6.4f}  {r.support:>7d}"
        )
    lines.append("")
    lines.append("Confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + "  " + "  ".join(f"{c:>{width}}" for c in report.classes))
    for name, row in zip(report.classes, report.confusion):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def format_fold_summary(summary: FoldSummary) -> str:
    width = max(8, *(len(str(r["name"])) for r in summary.rows))
    lines = [
        f"{summary.n_folds}-fold summary: accuracy {summary.accuracy_mean:.4f} ± {summary.accuracy_std:.4f} (mean ± sd)"
    ]
    lines.append(f"{'Class':<{width}}  {'Accuracy':>15}  {'Precision':>15}  {'Recall':>15}  {'F1':>15}")
    for r in summary.rows:
        cells = "  ".join(
            f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}".rjust(15) for m in ("accuracy", "precision", "recall", "f1")
        )
        lines.append(f"{r['name']:<{width}}  {cells}")
    return "\n".join(lines)
