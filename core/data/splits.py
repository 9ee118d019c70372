"""Train/validation/test splits of a dataset's source images, always made before augmentation.

Protocols:
  holdout      stratified test part (paper: 20%), validation carved from the rest
  kfold        stratified k folds; fold i is the test part of run i
  paper-leaky  the paper's own protocol: every image goes into a pool, the run augments the pool
               and only then splits the augmented copies, so copies of one source image (and
               images of one specimen) land on both sides. For reproducing the paper's number only.

With groups (specimens/patients), holdout and k-fold are grouped: no group is on both sides of
any boundary (train/val/test). Splits are seeded and stored, so a run can be re-made exactly.

A split is made over one version of the dataset (core/data/versions.py): that version's images, with
the classes and groups they have in it, so images added or relabelled since change nothing of it.

A frozen test part (RunConfig.frozen_test_of_run): a holdout split whose test part is exactly an
earlier run's test images (matched by content), the rest split into training and validation as usual
and never into test, so that a run trained again on a newer version is scored on the same images as
the run it may replace (core/review/retrain.py compares the two).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data import versions
from core.errors import UserError
from core.store.db import Dataset, Image, Run, Split, SplitMember

PROTOCOLS = ("holdout", "kfold", "paper-leaky")


def _folds(labels: np.ndarray, groups: np.ndarray | None, n_folds: int, seed: int) -> list[np.ndarray]:
    """Indices of each of n_folds stratified (and grouped, if groups given) test folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # slow import; only k-fold needs it

    x = np.zeros(len(labels))
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(x, labels)]
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(x, labels, groups)]


def _holdout(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Indices of about `fraction` of each class's images, taking whole groups.

    Each group is assigned to its most common class; per class, a seeded shuffle of its groups
    is taken in order while that brings the count closer to the target, keeping at least one
    group on each side. Ungrouped images are groups of one.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(len(labels)).astype(str)
    group_ids, group_of = np.unique(groups, return_inverse=True)
    label_of = np.unique(labels, return_inverse=True)[1]
    group_label = np.array([np.bincount(label_of[group_of == k]).argmax() for k in range(len(group_ids))])
    group_size = np.bincount(group_of)
    chosen = []
    for label_index in range(label_of.max() + 1):
        candidates = np.flatnonzero(group_label == label_index)
        rng.shuffle(candidates)
        target = fraction * group_size[candidates].sum()
        taken = 0
        for k in candidates[:-1]:
            if taken and abs(taken + group_size[k] - target) >= abs(taken - target):
                break
            chosen.append(k)
            taken += group_size[k]
    return np.flatnonzero(np.isin(group_of, chosen))


def _check_enough(labels: np.ndarray, groups: np.ndarray | None, n_parts: int, what: str) -> None:
    units = "groups" if groups is not None else "images"
    for label in np.unique(labels):
        members = labels == label
        count = len(np.unique(groups[members])) if groups is not None else int(members.sum())
        if count < n_parts:
            raise UserError(
                f"Class {str(label)!r} has {count} {units}; a {what} needs at least {n_parts} "
                f"{units} per class. Add images, or use fewer folds / a larger fraction."
            )
    if groups is not None and len(np.unique(groups)) < n_parts:
        raise UserError(f"Only {len(np.unique(groups))} groups; a {what} needs at least {n_parts}.")


def assign_parts(
    labels: Sequence[str],
    groups: Sequence[str | None] | None,
    *,
    protocol: str,
    seed: int,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    folds: int = 5,
    frozen_test: Sequence[bool] | None = None,
) -> list[list[str]]:
    """For each fold, the part ("train", "val", "test" or "pool") of every image, in input order.

    `val_fraction` is a fraction of the images left after the test part; 0 means no validation.
    `frozen_test` (holdout only): the images that are the test part, exactly; the others never are.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"Unknown split protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    if not 0 < test_fraction < 1:
        raise UserError(f"test fraction must be between 0 and 1, got {test_fraction}.")
    if not 0 <= val_fraction < 1:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}.")
    y = np.asarray(labels)
    g = None
    if groups is not None and any(x is not None for x in groups):
        if any(x is None for x in groups):
            raise UserError("Some images have a group and others have none; give every image a group.")
        g = np.asarray(groups)
    frozen = None if frozen_test is None else _frozen(frozen_test, g, protocol)
    if protocol == "paper-leaky":
        return [["pool"] * len(y)]

    if frozen is not None:
        tests = [frozen]
    elif protocol == "holdout":
        _check_enough(y, g, 2, "holdout split")
        tests = [_holdout(y, g, test_fraction, seed)]
    else:
        if folds < 2:
            raise UserError(f"k-fold needs at least 2 folds, got {folds}.")
        _check_enough(y, g, folds, f"{folds}-fold split")
        tests = _folds(y, g, folds, seed)

    result = []
    for test in tests:
        parts = np.array(["train"] * len(y), dtype=object)
        parts[test] = "test"
        if val_fraction > 0:
            rest = np.flatnonzero(parts == "train")
            # Validation is carved from the training part with its own seed offset, so the
            # test part is the same whether or not a validation part is used.
            g_rest = g[rest] if g is not None else None
            _check_enough(y[rest], g_rest, 2, "validation part")
            val = rest[_holdout(y[rest], g_rest, val_fraction, seed + 1)]
            parts[val] = "val"
        result.append(parts.tolist())
    return result


def _frozen(frozen_test: Sequence[bool], groups: np.ndarray | None, protocol: str) -> np.ndarray:
    """The indices of a frozen test part; UserError where it cannot be one."""
    if protocol != "holdout":
        raise UserError(f"A run's test images can be kept as the test part of a holdout split only, not of {protocol}.")
    test = np.asarray(frozen_test, dtype=bool)
    if not test.any() or test.all():
        raise UserError("A frozen test part needs test images and other images to train on.")
    if groups is not None:
        shared = sorted(set(groups[test].tolist()) & set(groups[~test].tolist()))
        if shared:  # the images of a specimen would be on both sides of the comparison
            raise UserError(
                f"{len(shared)} specimen group(s) have images both among the kept test images and among the "
                f"others, e.g. {shared[0]!r}; train without grouping, or regroup those images."
            )
    return np.flatnonzero(test)


def _test_shas(session: Session, run_id: int) -> set[str]:
    """The sha256 of each test image of run `run_id`; UserError when it has no holdout test part."""
    run = session.get(Run, run_id)
    if run is None or run.split is None:
        raise UserError(f"Run {run_id} has no recorded split, so there are no test images of it to keep.")
    test = split_parts(session, run.split, run.fold).get("test", [])
    if not test:
        raise UserError(f"Run {run_id}'s split has no test part ({describe(run.split)}).")
    return {image.sha256 for image in test}


def make_split(
    session: Session,
    dataset: Dataset,
    *,
    protocol: str = "holdout",
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    folds: int = 5,
    grouped: bool | None = None,
    version: int | None = None,
    frozen_test_of_run: int | None = None,
) -> Split:
    """Return the stored split with these settings, making and storing it the first time.

    It is made over version `version` of the dataset (None: the latest), with the classes and groups
    its images have in that version; its params record the version's number.
    grouped=None means "grouped when the dataset has groups"; True without groups is an error.
    `frozen_test_of_run`: the test part is exactly that run's test images (each must be in the
    version; UserError naming how many are not), recorded in the params.
    """
    chosen = versions.resolve(session, dataset, version)
    images = versions.version_images(session, chosen)
    has_groups = any(im.group is not None for im in images)
    if grouped is None:
        grouped = has_groups and protocol != "paper-leaky"
    if grouped and not has_groups:
        raise UserError(f"Dataset {dataset.name!r} has no groups; ingest it with a group manifest or pattern.")
    params = {
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "folds": folds if protocol == "kfold" else 1,
        "n_images": len(images),
        "version": chosen.number,
    }
    frozen = None
    if frozen_test_of_run is not None:
        wanted = _test_shas(session, frozen_test_of_run)
        frozen = [im.sha256 in wanted for im in images]
        missing = len(wanted) - sum(frozen)
        if missing:
            raise UserError(
                f"{missing} of run {frozen_test_of_run}'s {len(wanted)} test images are not in version "
                f"{chosen.number} of dataset {dataset.name!r}, so it cannot be tested on the same images."
            )
        params["frozen_test_of_run"] = frozen_test_of_run
    existing = session.scalars(
        select(Split).where(
            Split.dataset_id == dataset.id,
            Split.protocol == protocol,
            Split.grouped == grouped,
            Split.seed == seed,
        )
    ).all()
    for split in existing:
        if split.params == params:
            return split

    parts_per_fold = assign_parts(
        [im.label for im in images],
        [im.group for im in images] if grouped else None,
        protocol=protocol,
        seed=seed,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        folds=folds,
        frozen_test=frozen,
    )
    split = Split(dataset_id=dataset.id, protocol=protocol, grouped=grouped, seed=seed, params=params)
    session.add(split)
    session.flush()
    session.add_all(
        SplitMember(split_id=split.id, fold=fold, image_id=im.image_id, part=part)
        for fold, parts in enumerate(parts_per_fold)
        for im, part in zip(images, parts)
    )
    session.flush()
    return split


def split_parts(session: Session, split: Split, fold: int) -> dict[str, list[Image]]:
    """The images of each part of one fold, e.g. {"train": [...], "val": [...], "test": [...]}, each
    with the class and group it has in the split's dataset version (a split made before versions: as
    it has now)."""
    rows = session.execute(
        select(SplitMember.part, Image)
        .join(Image, Image.id == SplitMember.image_id)
        .where(SplitMember.split_id == split.id, SplitMember.fold == fold)
        .order_by(Image.id)
    ).all()
    if not rows:
        raise UserError(f"Split {split.id} has no fold {fold}.")
    number = split.params.get("version")
    kept = versions.classes_and_groups(session, split.dataset_id, number) if number is not None else {}
    parts: dict[str, list[Image]] = {}
    for part, image in rows:
        parts.setdefault(part, []).append(_as_in_version(image, *kept.get(image.id, (image.label, image.group))))
    return parts


def _as_in_version(image: Image, label: str, group: str | None) -> Image:
    """`image` with the class and group it has in a version: itself where they are the same, else a
    copy that belongs to no session, so that nothing writes the version's values over the current ones."""
    if (image.label, image.group) == (label, group):
        return image
    return Image(
        id=image.id,
        dataset_id=image.dataset_id,
        label=label,
        sha256=image.sha256,
        stored_path=image.stored_path,
        original_name=image.original_name,
        width=image.width,
        height=image.height,
        mode=image.mode,
        group=group,
    )


def _ratio(split: Split) -> str:
    test = round(100 * split.params["test_fraction"])
    return f"{100 - test}/{test}"


def describe(split: Split) -> str:
    """A one-line label for reports, e.g. 'holdout 80/20, grouped, seed 0'."""
    if split.protocol == "paper-leaky":
        return f"paper-leaky (augment, then split {_ratio(split)}; LEAKY: copies of one image on both sides), seed {split.seed}"
    grouped = "grouped by specimen" if split.grouped else "not grouped (images of one specimen may be on both sides)"
    if split.protocol == "kfold":
        head = f"{split.params['folds']}-fold CV"
    else:
        head = f"holdout {_ratio(split)}"
    return f"{head}, {grouped}, seed {split.seed}"
