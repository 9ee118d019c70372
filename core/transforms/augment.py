"""Training-set augmentation as in Hasan et al.: Augmentor's rotate, random distortion and zoom.

We use Augmentor's operation objects but run them ourselves, because its Pipeline rounds the
random draw to one decimal (so p=0.4 fires ~45% of the time), writes into <source>/output/, and
its torch_transform() closure cannot be pickled for the spawned processes of `expand`.
Images are expected at the training size already: augmenting full-size images is ~100x slower.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import Augmentor
import numpy as np
from Augmentor.Operations import Distort, Flip, Rotate, RotateRange, ZoomRandom
from PIL import Image

from core.errors import UserError
from core.paper import PAPER

# Augmentor's operations draw from the global `random`/`np.random`; the lock keeps two threads
# (e.g. two Streamlit sessions) from interleaving their seeded streams.
_GLOBAL_RNG_LOCK = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class AugmentParams:
    """Augmentation settings; the defaults are the paper's (core/paper.py)."""

    rotate_probability: float = PAPER.augmentation.rotate_probability
    rotate_max_left: int = PAPER.augmentation.rotate_max_left
    rotate_max_right: int = PAPER.augmentation.rotate_max_right
    distortion_probability: float = PAPER.augmentation.distortion_probability
    distortion_grid_width: int = PAPER.augmentation.distortion_grid_width
    distortion_grid_height: int = PAPER.augmentation.distortion_grid_height
    distortion_magnitude: int = PAPER.augmentation.distortion_magnitude
    zoom_probability: float = PAPER.augmentation.zoom_probability
    zoom_percentage_area: float = PAPER.augmentation.zoom_percentage_area
    # Optional extras, off by default (not in the paper).
    flip_left_right_probability: float = 0.0
    flip_top_bottom_probability: float = 0.0
    rotate90_probability: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"Augmentation setting {f.name} must be a number, got {value!r}.")
            if f.name.endswith("_probability"):
                _check_range(f.name, value, 0.0, 1.0, "between 0 and 1")
            elif f.name.startswith("rotate_max_"):
                _check_int(f.name, value, 0, 25, "a whole number of degrees from 0 to 25 (Augmentor's limit)")
            # The Augmentation page's bounds: a grid of a million cells would tie up the shared worker.
            elif f.name.startswith("distortion_grid_"):
                _check_int(f.name, value, 1, 64, "a whole number from 1 to 64")
            elif f.name == "distortion_magnitude":
                _check_int(f.name, value, 0, 64, "a whole number from 0 to 64")
            elif f.name == "zoom_percentage_area" and not 0.1 <= value < 1:
                # Augmentor's zoom_random refuses 1.0 (a crop of the whole image would be a no-op).
                raise UserError(f"Augmentation setting {f.name} must be at least 0.1 and less than 1, got {value}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentParams:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise UserError(f"Unknown augmentation setting(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}.")
        return cls(**d)


def _check_range(name: str, value: float, low: float, high: float, allowed: str) -> None:
    if not low <= value <= high:
        raise UserError(f"Augmentation setting {name} must be {allowed}, got {value}.")


def _check_int(name: str, value: float, low: int, high: int, allowed: str) -> None:
    if value != int(value):
        raise UserError(f"Augmentation setting {name} must be {allowed}, got {value}.")
    _check_range(name, value, low, high, allowed)


def build_operations(params: AugmentParams) -> list:
    """Augmentor operation objects for `params`, in the paper's order; ops with probability 0 are left out."""
    p = Augmentor.Pipeline()  # no source directory: nothing is read or written
    if params.rotate_probability > 0:
        p.rotate(params.rotate_probability, int(params.rotate_max_left), int(params.rotate_max_right))
    if params.distortion_probability > 0:
        p.random_distortion(
            params.distortion_probability,
            int(params.distortion_grid_width),
            int(params.distortion_grid_height),
            int(params.distortion_magnitude),
        )
    if params.zoom_probability > 0:
        p.zoom_random(params.zoom_probability, params.zoom_percentage_area)
    if params.flip_left_right_probability > 0:
        p.flip_left_right(params.flip_left_right_probability)
    if params.flip_top_bottom_probability > 0:
        p.flip_top_bottom(params.flip_top_bottom_probability)
    if params.rotate90_probability > 0:
        p.rotate_random_90(params.rotate90_probability)
    return p.operations


def operation_name(op: Any) -> str:
    """The short name shown in the preview, matching the AugmentParams prefixes."""
    if isinstance(op, Flip):
        return {"LEFT_RIGHT": "flip_left_right", "TOP_BOTTOM": "flip_top_bottom"}.get(op.top_bottom_left_right, "flip")
    names = {RotateRange: "rotate", Distort: "distortion", ZoomRandom: "zoom", Rotate: "rotate90"}
    return names.get(type(op), type(op).__name__)


def augment(image: Image.Image, operations: list, seed: int) -> tuple[Image.Image, list[str]]:
    """Apply each operation with exactly its probability; returns the image and the names of the ops that fired."""
    image = image.convert("RGB")
    size = image.size
    fired = []
    with _GLOBAL_RNG_LOCK:
        saved = random.getstate(), np.random.get_state()
        try:
            # One stream for both the firing draws and the ops' own draws, so they stay independent.
            random.seed(seed)
            np.random.seed(seed % 2**32)
            for op in operations:
                if random.random() < op.probability:
                    image = op.perform_operation([image])[0]
                    fired.append(operation_name(op))
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
    if image.size != size:  # a 90/270 degree turn of a non-square image
        image = image.resize(size, Image.BICUBIC)
    return image, fired


def _sample_seeds(rng: random.Random, n: int) -> list[int]:
    return [rng.getrandbits(63) for _ in range(n)]


def expand(
    images: Sequence[Image.Image],
    labels: Sequence[int],
    per_class: int,
    params: AugmentParams,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    *,
    num_classes: int | None = None,
    workers: int = 0,
) -> tuple[list[Image.Image], list[int], list[int]]:
    """Make exactly `per_class` augmented images for each class 0..num_classes-1.

    Sources are drawn balanced (each used floor or ceil of per_class/n times, from a seeded
    shuffle) rather than with replacement as Augmentor does. `workers` > 1 spreads the work over
    that many processes with identical results. Returns (images, labels, source_indices).
    """
    if per_class < 1:
        raise UserError(f"Images per class must be at least 1, got {per_class}.")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if num_classes is None:
        num_classes = max(labels, default=-1) + 1
    if num_classes < 1:
        raise UserError("There are no images to augment.")
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, label in enumerate(labels):
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} is outside 0..{num_classes - 1}")
        by_class[label].append(i)
    empty = [c for c, members in enumerate(by_class) if not members]
    if empty:
        raise UserError(f"Class(es) {', '.join(map(str, empty))} have no images to augment.")

    # Plan every sample first (source, label, seed), so the result is the same however many
    # processes do the work.
    rng = random.Random(seed)
    plan: list[tuple[int, int, int]] = []
    for label, members in enumerate(by_class):
        order = members[:]
        rng.shuffle(order)
        plan += [(order[k % len(order)], label, s) for k, s in enumerate(_sample_seeds(rng, per_class))]

    out_images: list[Image.Image] = []
    if workers > 1 and len(plan) >= 64 * workers:  # below that, starting the processes costs more
        # Spawned processes: safe beside torch's threads, and Augmentor's global RNG use stays per process.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(params,)) as pool:
            jobs = ((images[src], sample_seed) for src, _, sample_seed in plan)
            for image in pool.map(_augment_in_worker, jobs, chunksize=16):
                out_images.append(image)
                if progress is not None:
                    progress(len(out_images), len(plan))
    else:
        operations = build_operations(params)
        for src, _, sample_seed in plan:
            out_images.append(augment(images[src], operations, sample_seed)[0])
            if progress is not None:
                progress(len(out_images), len(plan))
    return out_images, [label for _, label, _ in plan], [src for src, _, _ in plan]


_worker_operations: list = []


def _init_worker(params: AugmentParams) -> None:
    _worker_operations[:] = build_operations(params)


def _augment_in_worker(job: tuple[Image.Image, int]) -> Image.Image:
    return augment(job[0], _worker_operations, job[1])[0]


def preview(image: Image.Image, params: AugmentParams, n: int, seed: int) -> list[tuple[Image.Image, list[str]]]:
    """`n` augmented versions of one image, each with the names of the ops that fired."""
    if n < 1:
        raise UserError(f"The number of previews must be at least 1, got {n}.")
    operations = build_operations(params)
    return [augment(image, operations, s) for s in _sample_seeds(random.Random(seed), n)]
