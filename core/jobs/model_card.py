"""A model card for a run that succeeded: what the model is for and not for, what it was trained and
tested on, how far its figures and confidences can be trusted, who approved it, and which file it is.

`model_card` gathers the facts as a typed record (ModelCard) from the records the Runs page reads;
`sections` says them in words, once; `to_markdown` and `to_html` lay the same sections out. Every
text in a section is plain text: names from outside (dataset, classes, users, notes) are escaped in
both layouts, Markdown by a backslash before each markup character and HTML by html.escape, so no
name becomes a link, a tag or a script. The calibration and yardstick sentences are those of
core/evaluation/calibration_words.py and yardstick.py, as the command line and the pages say them.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from core.config import Settings
from core.data import slide_views, versions
from core.data.datasets import get_dataset
from core.errors import UserError
from core.evaluation import metrics, yardstick
from core.evaluation.calibration import BootstrapResult
from core.evaluation.calibration_words import CalibrationWords, calibration_words
from core.inference import approval
from core.inference.approval import ApprovalRecord
from core.jobs.views import RunRow, run_row
from core.review.field import FieldAccuracy, field_accuracy
from core.store.db import RunStatus
from core.store.runs import get_run, model_path

NO_FIELD = "No reviewed predictions yet."
INTENDED_USE = (
    "A research tool that sorts H&E-stained images of lymphoma into the classes it was trained on, to "
    "study and compare models. It is not a diagnosis and must not be used for one, nor to decide any "
    "patient's care."
)
NOT_FOR = (
    "Images stained otherwise than with H&E, tissue or subtypes outside its classes (it always answers with "
    "one of them), images taken at another scale than it was trained at, and any use where a wrong answer "
    "reaches a patient."
)
PROTOCOLS = {
    "holdout": "Holdout: one split into training, validation and test parts.",
    "kfold": "K-fold cross-validation: this run is one fold, tested on the images the fold left out.",
    "paper-leaky": (
        "Paper reproduction (LEAKY): the images were augmented before the split, as in the paper, so copies "
        "of one image are on both sides and the test figures overstate accuracy on new images."
    ),
}


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Section:
    """A heading, paragraphs of plain text and an optional table: what both layouts draw."""

    title: str
    paragraphs: tuple[str, ...]
    table: Table | None = None


@dataclass(frozen=True)
class ModelCard:
    """The facts of a model card, gathered from a succeeded run's records."""

    run: RunRow
    counts: tuple[tuple[str, int], ...]  # images per class in the version it trained on
    groups: int  # specimen groups among those images
    groups_estimated: bool  # estimated from file numbers, not given
    scale: str | None  # the scale its images were taken at, in words; None where unknown
    split_protocol: str  # holdout | kfold | paper-leaky
    folds: int
    report: metrics.Report
    bootstrap: BootstrapResult
    calibration: CalibrationWords
    yardstick: str | None
    approvals: tuple[ApprovalRecord, ...]  # of its class set, newest first
    model_sha256: str | None  # None: its model file is missing
    field: FieldAccuracy | None = None
    made_at: datetime | None = None

    @property
    def approved(self) -> bool:
        return any(a.current and a.run_id == self.run.id for a in self.approvals)


def model_card(session: Session, settings: Settings, run_id: int) -> ModelCard:
    """The card of run `run_id`, with its field accuracy once any of its logged predictions was
    reviewed; UserError for an unknown run or one that did not succeed."""
    run = get_run(session, run_id)
    if run.status != RunStatus.succeeded:
        raise UserError(f"Run {run_id} is {run.status.value}: only a run that succeeded has a model card.")
    row = run_row(session, run_id)
    counts, groups = _training_images(session, run.dataset.name, row)
    path = model_path(settings, run_id)
    mine = approval.class_set_key(row.classes)
    return ModelCard(
        run=row,
        counts=counts,
        groups=groups,
        groups_estimated=bool(row.groups_estimated),
        scale=slide_views.dataset_scale(session, run.dataset.name).words,
        split_protocol=run.split.protocol if run.split is not None else row.config.split,
        folds=int(run.split.params.get("folds", 1)) if run.split is not None else 1,
        report=metrics.run_report(session, run),
        bootstrap=metrics.run_uncertainty(session, run).bootstrap,
        calibration=calibration_words(row.summary.calibration),
        yardstick=yardstick.describe(row.summary.colour_yardstick),
        approvals=tuple(a for a in approval.approval_history(session) if a.class_set == mine),
        model_sha256=approval.file_sha256(path) if path.exists() else None,
        field=_field(session, run_id),
        made_at=datetime.now().astimezone(),
    )


def _training_images(session: Session, name: str, row: RunRow) -> tuple[tuple[tuple[str, int], ...], int]:
    """Images per class and specimen groups of the version the run trained on (the dataset as it is
    now for a run recorded before versions)."""
    dataset = get_dataset(session, name)
    number = row.config.dataset_version
    version = versions.latest(session, dataset.id) if number is None else versions.get_version(session, dataset, number)
    if version is not None:
        images = [(im.label, im.group) for im in versions.version_images(session, version)]
    else:  # a dataset without any version yet: its images as they are
        images = [(im.label, im.group) for im in dataset.images]
    per_class = Counter(label for label, _ in images)
    return tuple((c, per_class.get(c, 0)) for c in row.classes), len({g for _, g in images if g})


def _pct(value: float) -> str:
    return f"{value:.1%}"


def sections(card: ModelCard) -> list[Section]:
    """The card in words, section by section."""
    run = card.run
    return [
        Section("Intended use", (INTENDED_USE, f"Its classes: {', '.join(run.classes)}.")),
        Section("Not to be used for", (NOT_FOR, _scale_words(card))),
        _data_section(card),
        _protocol_section(card),
        _metrics_section(card),
        Section(
            "Calibration and the refer band",
            (card.calibration.text(),) if not card.calibration.calibrated else _calibration_lines(card.calibration),
        ),
        Section("Colour-only yardstick", (card.yardstick or "No colour-only yardstick was recorded for this run.",)),
        Section("Field accuracy", (NO_FIELD,) if card.field is None else _field_lines(card.field)),
        _approval_section(card),
        Section(
            "Model file",
            (
                f"runs/{run.id}/model.safetensors, sha256 {card.model_sha256}"
                if card.model_sha256
                else "The run's model file is missing: no file matches this card.",
            ),
        ),
    ]


def _field(session: Session, run_id: int) -> FieldAccuracy | None:
    field = field_accuracy(session, run_id)
    return field if field.reviewed else None


def _field_lines(field: FieldAccuracy) -> tuple[str, ...]:
    """Field accuracy in words: on reviewed predictions of the model in use, not on its test split."""
    recall = ", ".join(
        f"{name} {'no case' if r is None else _pct(r)}" for name, r in zip(field.classes, field.recall, strict=True)
    )
    shares = []
    if field.referred_share is not None:
        shares.append(f"{_pct(field.referred_share)} of its {field.predictions} logged predictions were referred")
    if field.overruled_share is not None:
        shares.append(f"reviewers overruled it in {field.overruled} of {field.class_reviews} reviews")
    return (
        f"Protocol: field, reviewed predictions. {field.summary()}",
        f"Recall per true class: {recall}.",
        *([("; ".join(shares) + ".").capitalize()] if shares else []),
    )


def _scale_words(card: ModelCard) -> str:
    size = f"resized to {card.run.config.image_size} px for the network"
    if card.scale:
        return f"Trained scale: {card.scale}; {size}."
    return f"Trained scale: not recorded for its images ({size}); use images taken as its training images were."


def _calibration_lines(words: CalibrationWords) -> tuple[str, ...]:
    # The technical sentence gives the temperature and the calibration errors (ECE) once.
    return (words.scaling_sentence, f"Refer band: {words.refer_sentence}", words.technical)


def _data_section(card: ModelCard) -> Section:
    run = card.run
    groups = (
        f"{card.groups} specimen groups, "
        + ("estimated from file numbers (an approximation)" if card.groups_estimated else "as given at ingest")
        if card.groups
        else "no specimen groups known"
    )
    return Section(
        "Training data",
        (
            f"Dataset {run.dataset}, {run.version_text}: {sum(n for _, n in card.counts)} images, {groups}.",
            f"Samples of this run: {run.summary.n_train} training (augmented), {run.summary.n_val} validation and "
            f"{run.summary.n_test} test.",
        ),
        Table(("class", "images"), tuple((c, str(n)) for c, n in card.counts)),
    )


def _protocol_section(card: ModelCard) -> Section:
    run = card.run
    kind = PROTOCOLS.get(card.split_protocol, card.split_protocol)
    if card.split_protocol == "kfold":
        kind += f" Fold {run.fold + 1} of {card.folds}."
    grouped = (
        "Grouped by specimen: each specimen's images are on one side of the split."
        if run.grouped
        else "Not grouped: images of one specimen may be on both sides, which flatters the test figures."
    )
    return Section("Protocol and split", (kind, f"{grouped} Seed {run.seed}."))


def _metrics_section(card: ModelCard) -> Section:
    boot, report = card.bootstrap, card.report
    how = (
        f"{boot.n_groups} specimens (or source images) resampled whole"
        if boot.n_groups is not None
        else "test images resampled one by one"
    )
    acc = boot.accuracy
    rows = []
    for row in report.rows:
        cells = [row.name]
        for metric in ("precision", "recall", "f1"):
            i = boot.per_class.get(row.name, {}).get(metric)
            known = i is not None and not (math.isnan(i.low) or math.isnan(i.high))
            cells.append(f"{getattr(row, metric):.3f}" + (f" ({i.low:.3f}–{i.high:.3f})" if known else " (–)"))
        rows.append((*cells, str(row.support)))
    return Section(
        "Test metrics",
        (
            f"Accuracy {_pct(acc.estimate)} on {report.n} test samples, {boot.level:.0%} interval "
            f"{_pct(acc.low)}–{_pct(acc.high)} ({how}, {boot.n_resamples} bootstrap resamples).",
            f"Measured under: {card.run.protocol}.",
        ),
        Table(("class", "precision", "recall", "F1", "test samples"), tuple(rows)),
    )


def _approval_section(card: ModelCard) -> Section:
    classes = ", ".join(sorted(card.run.classes))
    state = (
        f"This run is the approved model for {classes}."
        if card.approved
        else f"This run is not the approved model for {classes}."
    )
    if not card.approvals:
        return Section("Approval history", (state, "No model has been approved for these classes."))
    rows = tuple(
        (
            a.run_label,
            a.state,
            a.approved_by,
            f"{a.approved_at:%Y-%m-%d %H:%M} UTC",
            a.note,
            a.withdrawn_by or "",
        )
        for a in card.approvals
    )
    return Section(
        "Approval history",
        (state,),
        Table(("model", "state", "approved by", "approved", "note", "withdrawn or replaced by"), rows),
    )


def title(card: ModelCard) -> str:
    approved = " (approved model)" if card.approved else ""
    return f"Model card: run {card.run.id}{approved} · {card.run.title}"


# ------------------------------------------------------------------------------------------------
# Layouts

# Enough to keep a name text: no tag (<, >) or entity (&name;), no link or picture ([ ]), no emphasis
# or code, no table cell break (|); parentheses alone make no link.
_MARKUP = re.compile(r"([\\`*_\[\]<>|~]|&(?=#?\w+;))")


def md_escape(text: str) -> str:
    """`text` as Markdown that shows it as it is: each character that could start markup (a link, a
    tag, emphasis, an entity) after a backslash, on one line."""
    return _MARKUP.sub(r"\\\1", " ".join(str(text).split()))


def to_markdown(card: ModelCard) -> str:
    lines = [f"# {md_escape(title(card))}", ""]
    if card.made_at is not None:
        lines += [f"Made {card.made_at:%Y-%m-%d %H:%M %Z}.", ""]
    for section in sections(card):
        lines += [f"## {md_escape(section.title)}", ""]
        for paragraph in section.paragraphs:
            lines += [md_escape(paragraph), ""]
        if section.table is not None:
            lines.append("| " + " | ".join(md_escape(h) for h in section.table.header) + " |")
            lines.append("|" + "---|" * len(section.table.header))
            lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in section.table.rows]
            lines.append("")
    return "\n".join(lines)


def to_html(card: ModelCard) -> str:
    """A standalone HTML page of the card; every text escaped, no script, no external resource."""
    esc = html.escape
    body = [f"<h1>{esc(title(card))}</h1>"]
    if card.made_at is not None:
        body.append(f"<p>Made {esc(f'{card.made_at:%Y-%m-%d %H:%M %Z}')}.</p>")
    for section in sections(card):
        body.append(f"<h2>{esc(section.title)}</h2>")
        body += [f"<p>{esc(p)}</p>" for p in section.paragraphs]
        if section.table is not None:
            head = "".join(f"<th>{esc(h)}</th>" for h in section.table.header)
            rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in section.table.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{esc(title(card))}</title><style>{style}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
