"""Home's headline: the best run on a split grouped by specimen, beside colour alone on that split;
and the models in use, each with how it has done on the predictions people reviewed."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from core.evaluation.compare import PairedComparison
from core.inference.approval import ApprovalRecord, current_approvals
from core.jobs.views.runs import RunRow
from core.review.field import FieldAccuracy, field_accuracy
from core.store.db import RunStatus


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
        record = None if self.run is None else self.run.summary.colour_yardstick
        return None if record is None else record.accuracy

    def explanation(self, versus_colour: PairedComparison | None = None) -> str:
        """Plain words on what the number means; `versus_colour`: the run against colour alone on the
        same test images (core/jobs/comparisons.py), which decides whether the network "does better"."""
        if self.run is None:
            text = (
                "No finished run on a split grouped by specimen yet, so there is no honest estimate for "
                "new patients. Give the dataset specimen groups on the Datasets page and train with the "
                "split grouped."
            )
            if self.ungrouped is not None:
                text += (
                    f" The best run split by image (run {self.ungrouped.id}) scored "
                    f"{self.ungrouped.summary.test_accuracy:.1%}, but such a split can put images of one "
                    "specimen on both sides, which flatters the score."
                )
            return text
        fold = f", fold {self.run.fold + 1} of {self.run.config.folds}" if self.run.config.split == "kfold" else ""
        head = f"Run {self.run.id} ({self.run.protocol}{fold}): this run {self.accuracy:.1%}"
        if self.run.groups_estimated:
            head += (
                " on estimated specimens (groups cut from blocks of file numbers, not real specimen ids, so "
                "images of one specimen may still sit on both sides)"
            )
        if self.yardstick is None:
            return head + "; colour alone was not measured on its split."
        head += f"; colour alone on the same split: {self.yardstick:.1%}. "
        colour = (
            "'Colour alone' is a simple model that sees only the stain colours of each image (their "
            "averages and spreads), not the tissue. "
        )
        if versus_colour is None:
            return (
                head
                + colour
                + (
                    "This run did not record colour alone image by image, so whether the gap is more "
                    "than chance cannot be said; train it again to see."
                )
            )
        said = versus_colour.verdict("The network", "colour alone")
        if versus_colour.within_noise:
            return (
                head
                + colour
                + said
                + (
                    " So the network may rely on the stain of each class's slides rather "
                    "than the disease, and may not carry over to another laboratory's slides."
                )
            )
        if versus_colour.difference < 0:
            return head + colour + said + " The network has learnt less than the stain alone tells."
        return head + colour + said + " So it uses more than the stain."


def best_grouped(rows: list[RunRow]) -> BestGrouped:
    """The succeeded run with the best test accuracy on a split grouped by specimen; without one,
    the best honest run split by image (never the paper's leaky protocol)."""
    finished = [
        r for r in rows if r.status == RunStatus.succeeded.value and not r.leaky and r.summary.test_accuracy is not None
    ]
    grouped = [r for r in finished if r.grouped]
    best = max(grouped, key=lambda r: r.summary.test_accuracy, default=None)
    fallback = None if best else max(finished, key=lambda r: r.summary.test_accuracy, default=None)
    return BestGrouped(best, fallback)


@dataclass(frozen=True)
class InUse:
    """A model approved for its class set, with its field accuracy (core/review/field.py)."""

    approval: ApprovalRecord
    field: FieldAccuracy | None  # None: its run was deleted since

    def words(self) -> str:
        """E.g. 'run 3 · lymphoma, approved by ana on 2026-12-01. On reviewed predictions: right on ...'."""
        a = self.approval
        head = f"{a.run_label}, approved by {a.approved_by} on {a.approved_at:%Y-%m-%d}."
        if self.field is None or not self.field.counted:
            return head + " No prediction of it reviewed with an agreed true class yet (the Review page lists them)."
        f = self.field
        return (
            f"{head} On reviewed predictions (field, not a random draw): {f.accuracy:.1%}, {f.level:.0%} interval "
            f"{f.low:.1%} to {f.high:.1%}, over {f.counted} case(s); {f.blind} of {f.class_reviews} review(s) blind."
        )


def models_in_use(session: Session) -> list[InUse]:
    """Each class set's approved model, with its field accuracy."""
    return [
        InUse(a, None if a.run_id is None else field_accuracy(session, a.run_id)) for a in current_approvals(session)
    ]
