"""A colour-only yardstick for a split: how far stain colour alone gets on its test part.

Slides of one class often come from one laboratory or batch, so the classes can differ in stain
as well as in tissue. On the development images, 12 colour statistics per image with a logistic
regression score about 55% on unseen specimens, as much as a from-scratch CNN at 64 px
(docs/generalisation.md). Every honest run therefore records this yardstick on its own split: a
model that scores near it may have learnt little beyond the stain, which would not carry over to
another laboratory's slides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.store.records import Yardstick

IMAGE_SIZE = 128  # the size the leak audit decodes to, so the cached arrays are shared


def colour_features(image: np.ndarray) -> np.ndarray:
    """12 values of an HxWx3 uint8 image: mean and standard deviation of R, G, B and of their
    optical densities."""
    rgb = np.asarray(image, dtype=np.float64)
    od = -np.log((rgb + 1) / 256)
    return np.concatenate([rgb.mean((0, 1)), rgb.std((0, 1)), od.mean((0, 1)), od.std((0, 1))])


def colour_only_accuracy(
    train: Sequence[np.ndarray], train_labels: Sequence[int], test: Sequence[np.ndarray], test_labels: Sequence[int]
) -> float:
    """Test accuracy of a logistic regression on `colour_features`, fitted on the training images."""
    return float(np.mean(colour_only_correct(train, train_labels, test, test_labels)))


def colour_only_correct(
    train: Sequence[np.ndarray], train_labels: Sequence[int], test: Sequence[np.ndarray], test_labels: Sequence[int]
) -> np.ndarray:
    """Which test images the colour-only model gets right (booleans in test order), so that the
    network can be compared with it image by image (core/evaluation/compare.py)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not test:
        raise ValueError("the yardstick needs test images")
    if len(set(train_labels)) < 2:  # one class to learn from: it is all the model can say
        return np.asarray(test_labels) == train_labels[0]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(np.stack([colour_features(a) for a in train]), list(train_labels))
    return model.predict(np.stack([colour_features(a) for a in test])) == np.asarray(test_labels)


def split_yardstick(session, settings, split, classes: Sequence[str], fold: int = 0) -> Yardstick | None:
    """The yardstick of a stored split: fitted on its training and validation images, scored on
    its test images. None for the paper's protocol (its test part exists only after augmenting)
    and for a split without test images."""
    from core.data import splits

    if split.protocol == "paper-leaky":
        return None
    return parts_yardstick(settings, split, splits.split_parts(session, split, fold), classes)


def parts_yardstick(settings, split, parts: dict, classes: Sequence[str]) -> Yardstick | None:
    """`split_yardstick` of one fold whose images by part (`parts`) are loaded already; reads no database."""
    from core.data import cache  # torch-importing; keep `import core.evaluation.yardstick` light

    if split.protocol == "paper-leaky":
        return None
    seen, test = parts.get("train", []) + parts.get("val", []), parts.get("test", [])
    if not seen or not test:
        return None
    index = {name: i for i, name in enumerate(classes)}
    correct = colour_only_correct(
        [cache.resized_array(settings, im, IMAGE_SIZE) for im in seen],
        [index[im.label] for im in seen],
        [cache.resized_array(settings, im, IMAGE_SIZE) for im in test],
        [index[im.label] for im in test],
    )
    return Yardstick(
        float(correct.mean()),
        len(seen),
        len(test),
        # for comparing the network with colour alone on the same images
        correct=tuple((im.id, bool(c)) for im, c in zip(test, correct)),
    )


def describe(record: Yardstick | None) -> str | None:
    """A run's yardstick in one line, for reports, the command line and pages; None without one."""
    if record is None or record.accuracy is None:
        return None
    return (
        f"Colour-only yardstick on this split: {record.accuracy:.1%} (12 colour statistics per image, "
        f"logistic regression, {record.n_train} training and {record.n_test} test images). A model "
        "near this figure may rely on stain colour rather than tissue."
    )


def describe_folds(records: Sequence[Yardstick | None]) -> str | None:
    """One line for the yardstick across the folds of a k-fold experiment (None without any)."""
    accuracies = [r.accuracy for r in records if r is not None and r.accuracy is not None]
    if not accuracies:
        return None
    spread = f" ± {np.std(accuracies, ddof=1):.1%}" if len(accuracies) > 1 else ""
    return (
        f"Colour-only yardstick across {len(accuracies)} folds: {np.mean(accuracies):.1%}{spread} "
        "(mean ± sd; 12 colour statistics per image, logistic regression, same splits)."
    )
