"""The paper reproduction's report (core/jobs/reproduce.py trains the two runs): each protocol's
result as a record, the figures, and the Markdown's words, the settings table's paper column read
from core/paper.py's PAPER.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.paper import PAPER, Paper
from core.store.records import RunSummary
from core.training.run_config import RunConfig


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


def _reduced(config: RunConfig, weights_used: str, paper: Paper = PAPER) -> list[str]:
    """How `config` differs from the paper's settings, e.g. ['epochs 1 (paper: 25)']."""
    differ = [
        f"{k} {mine} (paper: {theirs})" for k, (mine, theirs) in paper.differences(config).items() if k != "weights"
    ]
    if not weights_used.lower().startswith(paper.weights):  # e.g. "imagenet (torchvision ...)"
        differ.append(f"weights {weights_used or config.weights} (paper: {_weights_words(paper.weights)})")
    return differ


def _weights_words(weights: str) -> str:
    return "ImageNet" if weights == "imagenet" else weights


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


def _settings_table(config: RunConfig, weights_used: str, paper: Paper = PAPER) -> list[str]:
    """The settings of both runs beside the paper's (its column read from `paper`, core/paper.py's)."""
    rows = [
        ("network", f"{paper.backbone}, FC {paper.hidden}, dropout {paper.dropout:g}", "the same"),
        ("image size", f"{config.image_size}x{config.image_size}", f"{paper.image_size}x{paper.image_size}"),
        ("augmented training images per class", config.per_class, paper.per_class),
        (
            "augmentation (Augmentor)",
            ", ".join(f"{k}={v}" for k, v in config.augmentation.items()),
            paper.augmentation.words(),
        ),
        ("backbone weights", weights_used or config.weights, _weights_words(paper.weights)),
        ("optimiser", f"Adam, lr {config.lr:g}", f"{paper.optimiser}, lr {paper.lr:g}"),
        ("batch size", config.batch_size, paper.batch_size),
        ("epochs", config.epochs, paper.epochs),
        (
            "test / validation fraction",
            f"{config.test_fraction:g} / {config.val_fraction:g} of the rest",
            f"{paper.test_fraction:g} / none",
        ),
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


@dataclass(frozen=True)
class ReportFacts:
    """What the report says, read from the database by core/jobs/reproduce.py's write_report."""

    dataset: str
    counts: dict[str, int]  # images per class
    n_groups: int  # specimen groups of the dataset (0: none)
    config: RunConfig  # the honest run's (both share it but for the protocol)
    grouped: bool  # the honest split keeps each specimen on one side
    chance: float  # the share of the largest class among the honest test images
    leaky: ProtocolResult
    honest: ProtocolResult
    honest_audit: Any  # audit.SplitAudit of the honest split
    by_image_audit: Any  # the same audit of a split by image, for comparison; None when not grouped


def write_files(out_dir: Path, facts: ReportFacts) -> Path:
    """Write out_dir/report.md and its PNG figures; returns the report's path."""
    f = facts
    dataset, counts, n_groups, config, grouped, chance = f.dataset, f.counts, f.n_groups, f.config, f.grouped, f.chance
    leaky, honest, honest_audit, by_image_audit = f.leaky, f.honest, f.honest_audit, f.by_image_audit
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
            f"the augmented copies are then split {_split_words(config.test_fraction)} (validation carved from the training part). "
            "Copies of one source image, "
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


def _split_words(test_fraction: float) -> str:
    """'80/20' for a test fraction of 0.2."""
    return f"{100 * (1 - test_fraction):.0f}/{100 * test_fraction:.0f}"
