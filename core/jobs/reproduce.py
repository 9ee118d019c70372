"""Reproduce the paper's number, and show what it measures: one report, two protocols, one model.

  paper's protocol  augment every image, then split the augmented copies 80/20 (Hasan et al.):
                    copies of each test image, and images of its specimen, are in training
  honest protocol   split the source images first (by specimen group when the dataset has groups),
                    augment only the training part, test on untouched images

Both runs use the same model, augmentation, optimiser, epochs, image size and seed; only the
protocol differs, so the gap between the two accuracies is what the leak adds. The report
(Markdown with PNG figures) holds both Table I layouts, the confusion matrices and training
curves, bootstrap intervals, a leak audit of the honest split and a plain-language verdict.

    python -m core reproduce-paper DATASET --out report-folder
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.errors import UserError
from core.store.db import Run
from core.store.records import RunSummary
from core.training import run_config
from core.training.run_config import RunConfig

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total), as in core.jobs.execute

# The paper's settings (DESIGN.md section 2); a report made with others says which differ.
PAPER = {
    "image_size": 224,
    "per_class": 1200,
    "epochs": 25,
    "batch_size": 24,
    "lr": 1e-4,
    "weights": "imagenet",
    "test_fraction": 0.2,
}


@dataclass
class ProtocolResult:
    key: str  # file-name stem: "paper-leaky" or "honest"
    title: str
    run_id: int
    protocol: str  # splits.describe of the run's split
    accuracy: float
    table: str  # metrics.format_report
    confusion: np.ndarray
    classes: list[str]
    epochs: list[dict[str, float | None]]
    summary: RunSummary
    weights_used: str
    device: str
    seconds: float
    bootstrap: Any  # calibration.BootstrapResult
    n_source_images: int  # distinct source images among the test samples


def _run_one(
    Session: sessionmaker, settings: Settings, config: RunConfig, label: str, progress: Progress | None
) -> int:
    from core.jobs import execute, runs

    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, config)
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
# Figures (matplotlib, Agg: no display needed)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(confusion: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.8, 3.4), dpi=100)
    ax.imshow(confusion, cmap="Blues", vmin=0, vmax=max(int(confusion.max()), 1))
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes)
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    high = confusion.max() / 2
    for i in ticks:
        for j in ticks:
            ax.text(
                j,
                i,
                int(confusion[i, j]),
                ha="center",
                va="center",
                color="white" if confusion[i, j] > high else "black",
            )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curves_png(epochs: list[dict[str, float | None]], title: str, path: Path) -> None:
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(7.0, 2.8), dpi=100)
    x = [e["epoch"] for e in epochs]
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(x, [e[f"train_{metric}"] for e in epochs], "o-", label="train (augmented)")
        val = [e[f"val_{metric}"] for e in epochs]
        if any(v is not None for v in val):
            ax.plot(x, [np.nan if v is None else v for v in val], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if len(x) < 12:
            ax.set_xticks(x)
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _or_unknown(count: int | None) -> int | str:
    return "?" if count is None else count


def _reduced(config: RunConfig, weights_used: str) -> list[str]:
    differ = [
        f"{k} {getattr(config, k)} (paper: {v})" for k, v in PAPER.items() if k != "weights" and getattr(config, k) != v
    ]
    if not weights_used.lower().startswith("imagenet"):
        differ.append(f"weights {weights_used or config.weights} (paper: ImageNet)")
    return differ


def _interval(r: ProtocolResult) -> str:
    b = r.bootstrap
    unit = ("specimen groups" if r.key == "honest" else "source images") if b.n_groups is not None else "samples"
    return (
        f"95% bootstrap interval {_pct(b.accuracy.low)}-{_pct(b.accuracy.high)}, resampling the "
        f"{b.n_groups if b.n_groups is not None else _or_unknown(r.summary.n_test)} test {unit}"
    )


def _verdict(leaky: ProtocolResult, honest: ProtocolResult, grouped: bool, chance: float) -> str:
    where = (
        "untouched images of specimens it never saw (grouped split)"
        if grouped
        else "untouched images it never saw (split by image: other images of the same specimens may be "
        "in training, so even this is optimistic)"
    )
    gap = 100 * (leaky.accuracy - honest.accuracy)
    text = (
        f"The paper's protocol scores **{_pct(leaky.accuracy)}**; on {where} the same model, trained the "
        f"same way, scores **{_pct(honest.accuracy)}** ({_interval(honest)}; "
        f"always answering the largest test class would score {_pct(chance)}). "
    )
    if gap > 0:
        text += (
            f"The gap of {gap:.1f} points is the leak: the paper's test set holds augmented copies of "
            "training images and images of training specimens, so its score measures recognising "
            "slides already seen, not diagnosing new ones."
        )
    else:
        text += (
            "At these settings there is no gap in the paper's favour; the honest score is the one to quote, "
            "and the paper's protocol still cannot be trusted to measure new images."
        )
    if honest.bootstrap.accuracy.low <= chance:
        text += (
            " On new specimens this model is not distinguishable from guessing the largest class: "
            "the interval includes that rate."
        )
    return text


def _settings_table(config: RunConfig, weights_used: str) -> list[str]:
    rows = [
        ("image size", f"{config.image_size}x{config.image_size}", "224x224"),
        ("augmented training images per class", config.per_class, 1200),
        (
            "augmentation (Augmentor)",
            ", ".join(f"{k}={v}" for k, v in config.augmentation.items()),
            "rotate 0.4/3/3, distortion 0.4/4/4/4, zoom 0.2/0.9",
        ),
        ("backbone weights", weights_used or config.weights, "ImageNet"),
        ("optimiser", f"Adam, lr {config.lr:g}", "Adam, lr 0.0001"),
        ("batch size", config.batch_size, 24),
        ("epochs", config.epochs, 25),
        ("test / validation fraction", f"{config.test_fraction:g} / {config.val_fraction:g} of the rest", "0.2 / none"),
        ("seed", config.seed, "not given"),
    ]
    lines = ["| setting | this report | paper |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines


def _protocol_section(r: ProtocolResult, explanation: str) -> list[str]:
    return [
        f"## {r.title}",
        "",
        explanation,
        "",
        (
            f"Run {r.run_id}: {_or_unknown(r.summary.n_train)} training, {_or_unknown(r.summary.n_val)} validation and "
            f"{_or_unknown(r.summary.n_test)} test samples (from {r.n_source_images} distinct source images); "
            f"device {r.device}; {r.seconds:.0f} s."
        ),
        "",
        f"Accuracy {_pct(r.accuracy)} ({_interval(r)}; {r.bootstrap.n_resamples} resamples, seed {r.bootstrap.seed}).",
        "",
        "Table I layout (per-class accuracy is one-vs-rest):",
        "",
        "```text",
        r.table,
        "```",
        "",
        f"![Confusion matrix, {r.title}](confusion-{r.key}.png) ",
        "",
        f"![Training curves, {r.title}](curves-{r.key}.png)",
        "",
    ]


def reproduce_paper(
    Session: sessionmaker,
    settings: Settings,
    dataset: str,
    base: RunConfig,
    out_dir: Path,
    progress: Progress | None = None,
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
    )
    honest_id = _run_one(
        Session, settings, base.replace(dataset=dataset, split="holdout", grouped=None, fold=0), "honest", progress
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

    out_dir.mkdir(parents=True, exist_ok=True)
    for r in (leaky, honest):
        confusion_png(
            r.confusion, r.classes, f"{r.title}\naccuracy {_pct(r.accuracy)}", out_dir / f"confusion-{r.key}.png"
        )
        curves_png(r.epochs, f"{r.title} (run {r.run_id})", out_dir / f"curves-{r.key}.png")

    lines = _opening_lines(dataset, counts, n_groups, config, leaky, honest, grouped, chance)
    lines += [
        "## Settings (shared by both runs)",
        "",
        *_settings_table(config, honest.weights_used),
        "",
    ]
    lines += _protocol_section(
        leaky,
        (
            f"Protocol: {leaky.protocol}. Every source image is augmented to {config.per_class} images per class first; "
            "the augmented copies are then split 80/20 (validation carved from the 80%). Copies of one source image, "
            "and images of one specimen, are on both sides: this reproduces the paper's number, it does not measure "
            "accuracy on new images."
        ),
    )
    lines += _protocol_section(
        honest,
        (
            f"Protocol: {honest.protocol}. The source images are split first"
            f"{', whole specimen groups at a time' if grouped else ''}; only the training part is augmented "
            f"(to {config.per_class} per class); the test images are never augmented or seen in training."
        ),
    )
    lines += _closing_lines(dataset, config, leaky, honest, honest_audit, by_image_audit, out_dir)
    path = out_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path


def _opening_lines(
    dataset: str, counts: dict[str, int], n_groups: int, config: RunConfig, leaky, honest, grouped: bool, chance: float
) -> list[str]:
    """The report's title, what data and settings it rests on, and its verdict with the table of both protocols."""
    from core.evaluation import yardstick

    reduced = _reduced(config, honest.weights_used)
    on_cpu = honest.device.startswith("cpu")
    lines = [
        "# Reproducing Hasan et al. (modified DenseNet-201): the paper's protocol vs an honest one",
        "",
        (
            f"Dataset `{dataset}`: {sum(counts.values())} images ({', '.join(f'{c} {n}' for c, n in counts.items())}), "
            f"{f'{n_groups} specimen groups' if n_groups else 'no specimen groups (the honest split is by image)'}. "
            f"Generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `core.jobs.reproduce`; training and "
            f"evaluation took {leaky.seconds + honest.seconds:.0f} s of wall time on {honest.device or 'an unrecorded device'}."
        ),
        "",
    ]
    if reduced:
        label = (
            f"Reduced settings{' on CPU' if on_cpu else ''}"
            f"{', no ImageNet weights' if any(d.startswith('weights') for d in reduced) else ''}"
        )
        lines += [
            (
                f"> **{label}.** These numbers are NOT the paper's setting: " + "; ".join(reduced) + ". Both protocols "
                "share these settings, so the comparison between them holds; the absolute accuracies do not transfer "
                "to the paper's full setting."
            ),
            "",
        ]
    return lines + [
        "## Verdict",
        "",
        _verdict(leaky, honest, grouped, chance),
        "",
        "| protocol | what is tested | test samples | accuracy | 95% bootstrap interval |",
        "| --- | --- | --- | --- | --- |",
        (
            f"| paper (leaky) | augmented copies, split after augmentation | {_or_unknown(leaky.summary.n_test)} copies of "
            f"{leaky.n_source_images} images | {_pct(leaky.accuracy)} | {_pct(leaky.bootstrap.accuracy.low)}-"
            f"{_pct(leaky.bootstrap.accuracy.high)} |"
        ),
        (
            f"| honest | untouched images{' of held-out specimen groups' if grouped else ''} | "
            f"{_or_unknown(honest.summary.n_test)} images | {_pct(honest.accuracy)} | "
            f"{_pct(honest.bootstrap.accuracy.low)}-{_pct(honest.bootstrap.accuracy.high)} |"
        ),
        "",
        (
            "Intervals resample whole units (source images for the paper's augmented copies, specimen groups for a "
            "grouped split), since samples of one unit are not independent."
        ),
        "",
        *([yardstick.describe(honest.summary.colour_yardstick), ""] if honest.summary.colour_yardstick else []),
    ]


def _closing_lines(
    dataset: str, config: RunConfig, leaky, honest, honest_audit, by_image_audit, out_dir: Path
) -> list[str]:
    """The leak audit of the honest split (and of a split by image, for comparison), and how to make the report again."""
    from core.data import audit

    lines = ["## Leak audit of the honest split", "", audit.format_audit(honest_audit), ""]
    if by_image_audit is not None:
        lines += [
            (
                "For comparison, the same audit of a split **by image** (not grouped) of this data: "
                + by_image_audit.summary
                + " A ratio near 1 is what neighbouring images of one specimen on both sides look like."
            ),
            "",
        ]
    lines += [
        "## How this was made",
        "",
        "```bash",
        (
            f"python -m core reproduce-paper {dataset} --image-size {config.image_size} --per-class {config.per_class} "
            f"--epochs {config.epochs} --batch-size {config.batch_size} --weights {config.weights} --seed {config.seed} "
            f"--device {config.device} --out {out_dir.name}"
        ),
        "```",
        "",
        (
            f"Runs {leaky.run_id} (paper protocol) and {honest.run_id} (honest) are recorded in the app database with "
            "their full configuration; `python -m core evaluate RUN` prints their tables again."
        ),
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# CLI


class _StageLog:
    """Progress for the terminal: one stderr line per stage, and a line at most every 5 s within it."""

    def __init__(self) -> None:
        self.stage, self.last = None, 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage or done >= total or now - self.last >= 5:
            print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)
            self.stage, self.last = stage, now


# The settings reproduce-paper lets one change; the rest are the paper's (both protocols are run).
RUN_FLAGS = ("epochs", "image_size", "per_class", "batch_size", "weights", "seed", "device")


def cmd_reproduce_paper(args: argparse.Namespace, settings: Settings, Session: sessionmaker) -> None:
    base = run_config.from_flags(
        args, RUN_FLAGS, dataset=args.dataset, weights=args.weights or settings.default_weights
    )
    out = Path(args.out) if args.out else settings.app_home / "reports" / f"reproduce-{args.dataset}"
    path = reproduce_paper(Session, settings, args.dataset, base, out, progress=_StageLog())
    print(path)


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `reproduce-paper DATASET`; its handler is set as `func(args, settings, Session)`."""
    p = subparsers.add_parser(
        "reproduce-paper",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train under the paper's (leaky) protocol and the honest one; write a Markdown report",
        description="Train the same model twice, under the paper's protocol (augment, then split: leaky) and the "
        "honest one (split first, by specimen group when the dataset has groups), and write report.md with "
        "both Table I layouts, confusion matrices, training curves, a leak audit and a verdict. "
        "Defaults are the paper's settings; prints the report's path.",
    )
    p.add_argument("dataset", help="name of an ingested dataset")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: APP_HOME/reports/reproduce-DATASET)")
    run_config.add_flags(p, RUN_FLAGS)
    p.set_defaults(func=cmd_reproduce_paper)
    return p
