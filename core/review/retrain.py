"""Train again on a newer version, and compare on the same test images.

`train_again` queues a run with an earlier run's settings on a newer version of the data (the one
reviewed cases were added to, core/review/to_data.py), its test part frozen to the earlier run's
test images (RunConfig.frozen_test_of_run, honoured by core/data/splits.py): the new images can only
go to training and validation, and the two runs are scored on exactly the same images.

`frozen_test_comparisons` compares such a pair on those images, paired (core/evaluation/compare.py:
a bootstrap interval of the difference, McNemar's test), in one sentence that says "better" only
beyond noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.config import Settings
from core.data import versions
from core.data.datasets import get_dataset
from core.errors import UserError
from core.evaluation.compare import PairedComparison, paired_comparison
from core.inference import approval
from core.jobs.runs import create_runs
from core.store.db import Image, Prediction, Run, RunStatus
from core.store.runs import get_run
from core.training.run_config import RunConfig


def train_again(
    session: Session, settings: Settings, user: User, run_id: int, version: int, *, dataset: str | None = None
) -> int:
    """Queue a run with run `run_id`'s settings on `version` of `dataset` (None: the run's own), whose
    test part is exactly run `run_id`'s test images; its id. UserError for a viewer, a run that is
    not a holdout run, or a version that lacks some of those test images (nothing queued)."""
    require_editor(user, "train a model again")
    run = get_run(session, run_id)
    config = RunConfig.from_dict(run.config)
    if config.split != "holdout":
        raise UserError(
            f"Run {run_id} was trained on a {config.split} split; training again on the same test images "
            "needs a holdout run."
        )
    again = config.replace(dataset=dataset or config.dataset, dataset_version=version, frozen_test_of_run=run_id)
    (queued,) = create_runs(
        session,
        settings,
        again,
        user=user,
        name=f"run {run_id} again on version {version}",
        notes=f"Run {run_id}'s settings, trained on version {version} of {again.dataset}; tested on run {run_id}'s "
        "test images.",
    )
    return queued.id


@dataclass(frozen=True)
class FrozenTestComparison:
    """A run trained again (`new_run`) against the run whose test images it kept (`old_run`)."""

    old_run: int
    new_run: int
    new_status: str  # queued, running, succeeded, failed or cancelled
    test_images: int  # the old run's test images
    scored: int  # of those, the images both runs were scored on
    old_accuracy: float | None  # on those images; None before the new run has results
    new_accuracy: float | None
    paired: PairedComparison | None
    words: str  # the comparison in one sentence

    def to_json(self) -> dict:
        return asdict(self)


def frozen_test_comparisons(session: Session, run_id: int) -> list[FrozenTestComparison]:
    """Each comparison run `run_id` is part of: with the run whose test images it kept, and with each
    run that kept its test images; oldest pair first."""
    configs = {run_id: config for run_id, config in session.execute(select(Run.id, Run.config))}
    pairs = [(old, new) for new, c in configs.items() if (old := _frozen_of(c)) is not None]
    mine = sorted((old, new) for old, new in pairs if run_id in (old, new) and old in configs)
    return [_compare(session, old, new) for old, new in mine]


def _frozen_of(config: dict) -> int | None:
    try:
        return RunConfig.from_dict(config).frozen_test_of_run
    except UserError:  # a config this version cannot read: not one it trained again
        return None


def _correct(session: Session, run_id: int) -> dict[str, bool]:
    """Each test image's sha256 -> whether run `run_id` got it right."""
    rows = session.execute(
        select(Image.sha256, Prediction.true_label, Prediction.predicted_label)
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id == run_id, Prediction.aug_index.is_(None))
    )
    return {sha: true == predicted for sha, true, predicted in rows}


def _compare(session: Session, old_id: int, new_id: int) -> FrozenTestComparison:
    new = get_run(session, new_id)
    test = _correct(session, old_id)
    status = new.status.value
    if new.status != RunStatus.succeeded:
        words = (
            f"Run {new_id} is {status}; once it has succeeded it is compared with run {old_id} on run {old_id}'s "
            f"{len(test)} test images."
        )
        return FrozenTestComparison(old_id, new_id, status, len(test), 0, None, None, None, words)
    again = {sha: right for sha, right in _correct(session, new_id).items() if sha in test}
    paired = paired_comparison(again, test)
    if paired is None:
        words = f"Run {new_id} has no result on any of run {old_id}'s {len(test)} test images."
        return FrozenTestComparison(old_id, new_id, status, len(test), 0, None, None, None, words)
    words = paired.verdict(f"Run {new_id} (trained again)", f"run {old_id}")
    if paired.n < len(test):
        words += f" {len(test) - paired.n} of run {old_id}'s test images have no result of run {new_id}."
    return FrozenTestComparison(
        old_id, new_id, status, len(test), paired.n, paired.accuracy_b, paired.accuracy_a, paired, words
    )


@dataclass(frozen=True)
class RetrainChoice:
    """What a run can be trained again on: the newer versions of its dataset."""

    run_id: int
    dataset: str
    trained_on: int | None  # the version it was trained on (None: recorded before versions)
    newer: tuple[int, ...]  # later versions, newest first
    holdout: bool  # only a holdout run's test images can be kept

    @property
    def possible(self) -> bool:
        return self.holdout and bool(self.newer)


def retrain_choice(session: Session, run_id: int) -> RetrainChoice:
    """Run `run_id`'s dataset and the versions of it newer than the one it was trained on."""
    config = RunConfig.from_dict(get_run(session, run_id).config)
    try:
        numbers = [v.number for v in versions.version_list(session, config.dataset)]
    except UserError:  # the dataset was deleted since
        numbers = []
    trained = config.dataset_version
    newer = tuple(n for n in numbers if trained is None or n > trained)
    return RetrainChoice(run_id, config.dataset, trained, newer, config.split == "holdout")


def approved_for(session: Session, dataset: str) -> int | None:
    """The run of the approved model for `dataset`'s classes, if one is approved and not deleted."""
    try:
        classes = get_dataset(session, dataset).classes
    except UserError:
        return None
    found = approval.approved_run(session, classes)
    return None if found is None else found.run_id
