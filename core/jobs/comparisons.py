"""Comparisons the pages state in words, each made on the same test images (core/evaluation/compare.py):
a run against colour alone on its split, and one run against another; the intervals of the tables;
and the checks before a model is approved for everyday use.

Images of one specimen are resampled together when the split knew the specimens (its groups), so
the interval is not narrowed by near-copies; a split whose groups were estimated (blocks of file
numbers) says so in the sentence.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.evaluation.compare import PairedComparison, paired_comparison
from core.store.db import Image, Prediction, Run
from core.store.records import RunSummary


def test_correct(session: Session, run_id: int) -> dict[int, bool]:
    """Image id -> whether the run's model got it right, over its test images (one row per image:
    augmented copies of the paper's protocol are left out, they are not the same images)."""
    rows = session.execute(
        select(Prediction.image_id, Prediction.true_label, Prediction.predicted_label).where(
            Prediction.run_id == run_id, Prediction.aug_index.is_(None)
        )
    )
    return {image: truth == predicted for image, truth, predicted in rows}


def _groups(session: Session, image_ids: list[int]) -> dict[int, str] | None:
    """Image id -> specimen group, when every image has one; None otherwise (resample images)."""
    if not image_ids:
        return None
    rows = dict(session.execute(select(Image.id, Image.group).where(Image.id.in_(image_ids))).tuples().all())
    return None if any(not rows.get(i) for i in image_ids) else {i: str(rows[i]) for i in image_ids}


def network_vs_colour(session: Session, run_id: int) -> PairedComparison | None:
    """The run's model against the colour-only yardstick on the same test images; None when the
    run recorded no per-image yardstick (recorded before this comparison existed) or no test."""
    summary = RunSummary.from_dict(session.scalar(select(Run.summary).where(Run.id == run_id)))
    record = summary.colour_yardstick
    colour = dict(record.correct or ()) if record is not None else {}
    network = test_correct(session, run_id)
    if not colour or not network:
        return None
    return paired_comparison(network, colour, groups=_groups(session, list(network)))


def run_vs_run(session: Session, a: int, b: int) -> PairedComparison | None:
    """Run `a` against run `b` on the test images both were scored on; None when they share none
    (other splits: then no sentence can say which is better)."""
    first, second = test_correct(session, a), test_correct(session, b)
    if not first or not second:
        return None
    return paired_comparison(first, second, groups=_groups(session, [i for i in first if i in second]))


# (database, run id) -> its test interval: a finished run's never changes, and ids are never reused.
_intervals: dict[tuple[str, int], tuple[float, float] | None] = {}


def test_intervals(session: Session, runs: list[tuple[int, int]]) -> dict[int, tuple[float, float] | None]:
    """The 95% bootstrap interval of each finished run's test accuracy, as its Runs page shows it
    (core/evaluation/metrics.py run_uncertainty: same seed, specimens resampled whole where known),
    for tables that put it beside the figure. `runs`: (run id, seed) of succeeded runs. Read in one
    statement for the runs not yet remembered."""
    from core.evaluation.calibration import bootstrap_metrics
    from core.evaluation.metrics import resampled_groups

    database = str(session.get_bind().url)
    missing = [(i, seed) for i, seed in runs if (database, i) not in _intervals]
    if missing:
        rows = session.execute(
            select(
                Prediction.run_id,
                Prediction.true_label,
                Prediction.predicted_label,
                Prediction.aug_index,
                Prediction.image_id,
                Image.group,
            )
            .join(Image, Image.id == Prediction.image_id)
            .where(Prediction.run_id.in_([i for i, _ in missing]))
            .order_by(Prediction.id)
        ).all()
        by_run: dict[int, list] = {}
        for row in rows:
            by_run.setdefault(row.run_id, []).append(row)
        for run_id, seed in missing:
            found = by_run.get(run_id)
            if not found:
                _intervals[database, run_id] = None
                continue
            groups = resampled_groups(found, [r.group for r in found])  # as the Runs page's interval does
            labels = [r.true_label for r in found]
            classes = [str(c) for c in range(1 + max(max(labels), max(r.predicted_label for r in found)))]
            boot = bootstrap_metrics(labels, [r.predicted_label for r in found], classes, groups=groups, seed=seed)
            _intervals[database, run_id] = (boot.accuracy.low, boot.accuracy.high)
    return {i: _intervals[database, i] for i, _ in runs}


def approval_concerns(session: Session, run_id: int) -> list[str]:
    """Why approving run `run_id`'s model for everyday use needs a second thought, in plain words:
    it refers every prediction, or its test accuracy may be no better than colour alone or chance
    (its 95% interval reaches them), or it was measured under the paper's leaky protocol. Empty: none."""
    from core.evaluation.calibration import recorded_band

    run = session.get(Run, run_id)
    if run is None:
        return []
    summary = RunSummary.from_dict(run.summary)
    concerns = []
    band = recorded_band(summary.calibration)
    if band is not None and band.threshold is None:
        concerns.append(
            f'it marks every prediction "uncertain, refer": no confidence threshold can promise '
            f"{band.target:.0%} accuracy from its {band.n_val} validation images"
        )
    interval = test_intervals(session, [(run.id, run.seed)]).get(run.id)
    colour = None if summary.colour_yardstick is None else summary.colour_yardstick.accuracy
    chance = 1 / len(run.dataset.classes) if run.dataset.classes else None
    if interval is not None and summary.test_accuracy is not None:
        low, high = interval
        if colour is not None and low <= colour:
            concerns.append(
                f"its test accuracy, {summary.test_accuracy:.1%} (95% interval {low:.1%}–{high:.1%}), "
                f"may be no better than colour alone on the same split ({colour:.1%})"
            )
        if chance is not None and low <= chance:
            concerns.append(
                f"its test accuracy's 95% interval ({low:.1%}–{high:.1%}) reaches chance "
                f"(1 in {len(run.dataset.classes)}, {chance:.1%})"
            )
    if (run.config or {}).get("split") == "paper-leaky":
        concerns.append("it was tested under the paper's leaky protocol, whose accuracy says little about new patients")
    return concerns


def approve_checked(session: Session, settings, run_id: int, user, note: str, *, despite: bool = False):
    """Approve run `run_id` (core/inference/approval.py), but only with `despite` when it has
    approval_concerns: the person approving is told why first, and says they approve anyway."""
    from core.errors import UserError
    from core.inference import approval

    concerns = approval_concerns(session, run_id)
    if concerns and not despite:
        why = "; ".join(concerns)
        raise UserError(
            f"Run {run_id} was not approved: {why}. Approve it anyway with --despite.",
            page=f'Run {run_id} was not approved: {why}. Tick "Approve anyway" to approve it all the same.',
        )
    return approval.approve(session, settings, run_id, user, note)
