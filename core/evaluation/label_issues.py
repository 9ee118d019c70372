"""Suspected label errors: the images of a dataset version whose given class a trained model finds
least likely, for an editor to relabel or to confirm.

The rule is confident learning's (Northcutt et al., 2021, as the cleanlab library implements it):

- each class gets a threshold, the mean probability the model gives that class over the images
  labelled with it (its "self-confidence"): what a typical image of the class scores;
- an image is a suspect when the probability of its given class is below that class's threshold
  while another class's probability reaches its own threshold; the suspected class is the most
  probable of those;
- suspects are ranked by the probability of their given class, lowest first.

The probabilities must come from a model that did not train on the image. Those of a k-fold run of
the version are ideal: each image is in the test part of exactly one fold, so every image of the
version is scored out of fold. Without a k-fold run, the newest succeeded run of the version lends
its test predictions, and only its test images are ranked (LabelIssues.words says so). Runs of the
paper's protocol never lend theirs: their test images are augmented copies of training images.

An editor confirms a suspect's class (a LabelCheck row, core/store/label_checks.py): it is left out
for that version and the later ones while its class stays the same. Or relabels it, which records
the dataset's next version (core/data/versions.py relabel). Both refuse a viewer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.config import Settings
from core.data import versions
from core.data.datasets import get_dataset
from core.errors import UserError
from core.store.db import DatasetVersionImage, Image, Prediction, Run, RunStatus, Split
from core.store.label_checks import LabelCheck
from core.training.run_config import RunConfig

KFOLD, TEST_PART, NONE = "kfold", "test part", "none"  # where LabelIssues' probabilities came from


@dataclass(frozen=True)
class Suspect:
    """One suspect among the rows given to `find_suspects`."""

    index: int  # its row
    given: int  # its given class
    suspected: int  # the class the model finds more likely
    given_probability: float


def class_thresholds(labels: Sequence[int], probs: np.ndarray) -> np.ndarray:
    """Each class's mean probability over the rows labelled with it; NaN for a class with none."""
    labels = np.asarray(labels)
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        if (labels == k).any():
            out[k] = probs[labels == k, k].mean()
    return out


def find_suspects(labels: Sequence[int], probs: np.ndarray) -> list[Suspect]:
    """The rows whose given class (`labels`) is below its threshold while another class reaches its
    own, ranked by the given class's probability, lowest first (ties by row)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return []
    limits = class_thresholds(labels, probs)
    found = []
    for row, (given, p) in enumerate(zip(labels, probs)):
        if not p[given] < limits[given]:
            continue
        # A class no row is labelled with has no threshold (NaN): never reached.
        others = [k for k in range(len(p)) if k != given and p[k] >= limits[k]]
        if others:
            suspected = max(others, key=lambda k: p[k])
            found.append(Suspect(row, int(given), suspected, float(p[given])))
    return sorted(found, key=lambda s: (s.given_probability, s.index))


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given class the model doubts."""

    image_id: int
    sha256: str
    name: str  # its path inside its source, e.g. "CLL/001.tif"
    path: Path  # the stored file
    given: str  # its class in the version
    suspected: str  # the class the model finds more likely
    given_probability: float
    suspected_probability: float
    probabilities: tuple[float, ...]  # in LabelIssues.classes' order, raw as the run stored them
    run_id: int  # the run whose test part held it
    fold: int
    relabelled_to: str | None = None  # its class in the dataset's newest version, where that differs


@dataclass(frozen=True)
class LabelIssues:
    """The suspects of one dataset version and what they were found from."""

    dataset: str
    version: int
    classes: tuple[str, ...]
    source: str  # KFOLD, TEST_PART or NONE
    run_ids: tuple[int, ...]  # the runs whose predictions were read (the folds of one k-fold run)
    scored: int  # images of the version with probabilities
    images: int  # images in the version
    thresholds: tuple[float, ...]  # per class; NaN where no scored image has it
    issues: tuple[LabelIssue, ...]
    confirmed: int = 0  # suspects left out because an editor confirmed their class

    def words(self) -> str:
        """Where the probabilities came from and what was ranked, in a sentence or two."""
        runs = ", ".join(str(i) for i in self.run_ids)
        if self.source == NONE:
            return (
                f"No run trained on version {self.version} has succeeded, so no image of it has been scored. "
                "Train one (a k-fold run scores every image) to find suspected label errors."
            )
        if self.source == KFOLD:
            head = f"Out-of-fold probabilities of the k-fold run (runs {runs}): {self.scored} of the version's "
            head += f"{self.images} images scored by a fold that did not train on them."
        else:
            head = (
                f"Only the {self.scored} test images of run {runs} are ranked (of the version's {self.images}): "
                "no k-fold run of this version has succeeded, and a k-fold run would score every image."
            )
        hidden = f" {self.confirmed} suspect(s) left out: an editor confirmed their class." if self.confirmed else ""
        return f"{head} {len(self.issues)} suspected label error(s).{hidden}"


def _version_runs(session: Session, dataset_id: int, number: int) -> list[Run]:
    """The succeeded runs trained on version `number`, except the paper's protocol, newest first."""
    found = session.execute(
        select(Run, Split.protocol)
        .join(Split, Split.id == Run.split_id)
        .where(Run.dataset_id == dataset_id, Run.status == RunStatus.succeeded, Split.protocol != "paper-leaky")
        .order_by(Run.id.desc())
    ).all()
    return [run for run, _ in found if RunConfig.from_dict(run.config).dataset_version == number]


def _chosen_runs(session: Session, dataset_id: int, number: int) -> tuple[str, list[Run]]:
    """The folds of the k-fold run with most folds succeeded (the newest of equals), else the newest run."""
    runs = _version_runs(session, dataset_id, number)
    experiments: dict[str, list[Run]] = {}
    for run in runs:
        if run.split is not None and run.split.protocol == "kfold":
            experiments.setdefault(run.experiment, []).append(run)
    if experiments:
        best = max(experiments.values(), key=lambda folds: (len(folds), max(r.id for r in folds)))
        return KFOLD, sorted(best, key=lambda r: r.fold)
    return (TEST_PART, runs[:1]) if runs else (NONE, [])


def scored_versions(session: Session, name: str) -> list[int]:
    """The versions of dataset `name` that a succeeded run can score, newest first."""
    dataset = get_dataset(session, name)
    return [v.number for v in versions.version_list(session, name) if _version_runs(session, dataset.id, v.number)]


def label_issues(session: Session, settings: Settings, name: str, number: int) -> LabelIssues:
    """The suspected label errors of version `number` of dataset `name`, most doubtful first."""
    dataset = get_dataset(session, name)
    version = versions.get_version(session, dataset, number)
    members = {im.image_id: im for im in versions.version_images(session, version)}
    classes = tuple(dataset.classes)
    source, runs = _chosen_runs(session, dataset.id, number)
    rows = session.execute(
        select(Prediction.image_id, Prediction.probabilities, Prediction.run_id, Image.stored_path)
        .join(Image, Image.id == Prediction.image_id)
        .where(Prediction.run_id.in_([r.id for r in runs]))
        .order_by(Prediction.id)
    ).all()
    scored: dict[int, list] = {}
    for image_id, probs, run_id, stored in rows:
        if image_id in members and members[image_id].label in classes:
            scored.setdefault(image_id, [run_id, stored, []])[2].append(probs)
    ids = sorted(scored)
    probs = np.asarray([np.mean(scored[i][2], axis=0) for i in ids], dtype=np.float64).reshape(len(ids), len(classes))
    labels = [classes.index(members[i].label) for i in ids]
    kept = _confirmed(session, dataset.id, number, {i: members[i].label for i in ids})
    newest = versions.latest(session, dataset.id)
    now = {} if newest is None or newest.number == number else _labels(session, newest.id)
    folds = {r.id: r.fold for r in runs}
    issues, hidden = [], 0
    for s in find_suspects(labels, probs):
        image_id = ids[s.index]
        if image_id in kept:
            hidden += 1
            continue
        run_id, stored, _ = scored[image_id]
        im = members[image_id]
        later = now.get(image_id)
        issues.append(
            LabelIssue(
                image_id,
                im.sha256,
                im.name,
                settings.app_home / stored,
                im.label,
                classes[s.suspected],
                s.given_probability,
                float(probs[s.index, s.suspected]),
                tuple(float(p) for p in probs[s.index]),
                run_id,
                folds[run_id],
                later if later is not None and later != im.label else None,
            )
        )
    return LabelIssues(
        name,
        number,
        classes,
        source,
        tuple(r.id for r in runs),
        len(ids),
        len(members),
        tuple(float(t) for t in class_thresholds(labels, probs)) if ids else (),
        tuple(issues),
        hidden,
    )


def _labels(session: Session, version_id: int) -> dict[int, str]:
    rows = session.execute(
        select(DatasetVersionImage.image_id, DatasetVersionImage.label).where(
            DatasetVersionImage.version_id == version_id
        )
    )
    return dict(rows.tuples().all())


def _confirmed(session: Session, dataset_id: int, number: int, labels: dict[int, str]) -> set[int]:
    """The images whose class in version `number` (`labels`) an editor confirmed in it or an earlier one."""
    rows = session.execute(
        select(LabelCheck.image_id, LabelCheck.label).where(
            LabelCheck.dataset_id == dataset_id, LabelCheck.version <= number
        )
    )
    return {image_id for image_id, label in rows if labels.get(image_id) == label}


def _member(session: Session, name: str, number: int, image_id: int) -> versions.VersionImage:
    dataset = get_dataset(session, name)
    version = versions.get_version(session, dataset, number)
    found = next((im for im in versions.version_images(session, version) if im.image_id == image_id), None)
    if found is None:
        raise UserError(f"Image {image_id} is not in version {number} of dataset '{name}'.")
    return found


def confirm_label(session: Session, name: str, number: int, image_id: int, user: User) -> LabelCheck:
    """Record that `user` (an editor) found image `image_id`'s class in version `number` right: it is
    no longer listed as a suspect there or in later versions while its class stays the same."""
    require_editor(user, "confirm labels")
    image = _member(session, name, number, image_id)
    check = LabelCheck(
        dataset_id=get_dataset(session, name).id,
        image_id=image_id,
        version=number,
        label=image.label,
        checked_by=user.name,
    )
    session.add(check)
    session.flush()
    return check


def relabel_image(
    session: Session, settings: Settings, name: str, number: int, image_id: int, label: str, user: User
) -> int:
    """Give image `image_id` (a suspect of version `number`) class `label` in the dataset's next
    version, by `user` (an editor); returns that version's number."""
    require_editor(user, "relabel images")
    image = _member(session, name, number, image_id)
    note = f"{image.name}: {image.label} → {label} (a suspected label error in version {number})"
    return versions.relabel(session, settings, name, {image.sha256: label}, user=user, note=note).number
