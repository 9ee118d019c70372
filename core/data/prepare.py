"""A run's data, from its split's stored images to tensors, through the two pipelines
(core/transforms/pipelines.py):

    decode and cut (EvalPipeline.samples, cached) -> [choose the stain reference among the training
    images, fit the normaliser] -> stain normalisation of every part (EvalPipeline.prepare) ->
    augment the training part, [HED jitter] (TrainPipeline)

Validation and test samples are then exactly what the evaluation pipeline makes of those images,
so the run's own evaluation and later predictions see the same input. Reads no database: the
caller passes the split and its images, loaded beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.config import Settings
from core.data import cache, splits
from core.store.db import Image, Split
from core.transforms.pipelines import EvalPipeline, Progress, TrainPipeline
from core.transforms.stain import choose_reference

PARTS = ("train", "val", "test")


@dataclass
class Part:
    """One part of a run's data, as the model sees it."""

    x: torch.Tensor  # (N, 3, S, S) uint8 samples
    y: torch.Tensor  # (N,) int64: each sample's class
    owners: list[int] | None  # tiles: each sample's image within the part; None: a sample per image
    labels: list[int]  # each image's class

    @classmethod
    def of(
        cls,
        arrays: list[np.ndarray],
        labels: list[int],
        size: int,
        owners: list[int] | None = None,
        image_labels: list[int] | None = None,
    ) -> Part:
        x = cache.to_tensor(arrays) if arrays else torch.empty(0, 3, size, size, dtype=torch.uint8)
        return cls(x, torch.tensor(labels, dtype=torch.long), owners, labels if image_labels is None else image_labels)


@dataclass
class Prepared:
    train: Part
    val: Part
    test: Part
    test_ids: list[tuple[int, int | None]]  # (image id, augmented copy or None) of each test image
    pipeline: EvalPipeline  # fitted: its stain parameters are the run's
    stain_reference_image_id: int | None  # the training image the stains were normalised to


def prepare_data(
    settings: Settings,
    split: Split,
    parts: dict[str, list[Image]],
    classes: list[str],
    *,
    pipeline: EvalPipeline,
    train: TrainPipeline,
    progress: Progress | None = None,
) -> Prepared:
    """The train, validation and test parts of one fold of `split` (`parts`: its images by part)."""
    if split.protocol == "paper-leaky":
        return _prepare_leaky(settings, split, parts["pool"], classes, pipeline, train, progress)
    index = {name: i for i, name in enumerate(classes)}
    decode = (lambda done, total: progress("decode", done, total)) if progress else None
    x: dict[str, list[np.ndarray]] = {}
    owners: dict[str, list[int]] = {}
    for part in PARTS:
        x[part], owners[part] = cache.load_samples(
            settings, parts.get(part, []), pipeline, decode if part == "train" else None
        )
    reference = None
    if not pipeline.fitted:
        images = parts.get("train", [])
        # With tiles too, the reference is a whole training image.
        whole = (
            x["train"]
            if not pipeline.tiles
            else [cache.resized_array(settings, im, pipeline.image_size) for im in images]
        )
        reference, normaliser = choose_reference(whole, [im.id for im in images], pipeline.stain)
        pipeline = pipeline.with_stain(normaliser.to_params())
    x = _prepare_parts(pipeline, x, progress)
    labels = {part: [index[im.label] for im in parts.get(part, [])] for part in PARTS}
    y = {part: [labels[part][i] for i in owners[part]] for part in PARTS}
    aug, aug_labels = train(x["train"], y["train"], len(classes), progress)
    size, tiled = pipeline.image_size, bool(pipeline.tiles)
    return Prepared(
        train=Part.of(aug, aug_labels, size),
        val=Part.of(x["val"], y["val"], size, owners["val"] if tiled else None, labels["val"]),
        test=Part.of(x["test"], y["test"], size, owners["test"] if tiled else None, labels["test"]),
        test_ids=[(im.id, None) for im in parts.get("test", [])],
        pipeline=pipeline,
        stain_reference_image_id=reference,
    )


def _prepare_leaky(
    settings: Settings,
    split: Split,
    pool: list[Image],
    classes: list[str],
    pipeline: EvalPipeline,
    train: TrainPipeline,
    progress: Progress | None,
) -> Prepared:
    """The paper's protocol: augment every image, then split the augmented copies. Which images end
    up in training is only known after augmenting, so the stain reference comes from the whole pool
    (this protocol has no untouched test images anyway), and the test samples are augmented copies
    of prepared images."""
    index = {name: i for i, name in enumerate(classes)}
    decode = (lambda done, total: progress("decode", done, total)) if progress else None
    arrays, _ = cache.load_samples(settings, pool, pipeline, decode)  # whole images: tiles need a real split
    reference = None
    if not pipeline.fitted:
        reference, normaliser = choose_reference(arrays, [im.id for im in pool], pipeline.stain)
        pipeline = pipeline.with_stain(normaliser.to_params())
    arrays = pipeline.prepare(arrays, progress)
    aug, aug_labels, sources = train.augment(arrays, [index[im.label] for im in pool], len(classes), progress)
    (assignment,) = splits.assign_parts(
        [str(label) for label in aug_labels],
        None,
        protocol="holdout",
        seed=split.seed,
        test_fraction=split.params["test_fraction"],
        val_fraction=split.params["val_fraction"],
    )
    pick = {part: [i for i, p in enumerate(assignment) if p == part] for part in PARTS}
    x = {part: [aug[i] for i in pick[part]] for part in PARTS}
    y = {part: [aug_labels[i] for i in pick[part]] for part in PARTS}
    size = pipeline.image_size
    return Prepared(
        train=Part.of(train.jitter(x["train"], progress), y["train"], size),  # training copies only
        val=Part.of(x["val"], y["val"], size),
        test=Part.of(x["test"], y["test"], size),
        test_ids=[(pool[sources[i]].id, i) for i in pick["test"]],
        pipeline=pipeline,
        stain_reference_image_id=reference,
    )


def _prepare_parts(
    pipeline: EvalPipeline, x: dict[str, list[np.ndarray]], progress: Progress | None
) -> dict[str, list[np.ndarray]]:
    """Every sample of every part through `pipeline.prepare`, as one batch (one progress bar)."""
    flat = pipeline.prepare([a for part in PARTS for a in x[part]], progress)
    out, k = {}, 0
    for part in PARTS:
        out[part], k = flat[k : k + len(x[part])], k + len(x[part])
    return out
