"""The two ways into the model, in the style of torchvision's classification presets: one for
evaluation, one for training, each built once from a run's settings.

    EvalPipeline   an image -> resized whole to image_size, or cut into up to `tiles` tiles at
                   native resolution (core/transforms/tiles.py) -> [stain normalisation to the run's
                   reference, from its fitted parameters] ; [test-time augmentation] is a flag the
                   predictor applies to the model's input
    TrainPipeline  prepared training samples -> Augmentor expansion to `per_class` images per class
                   -> [HED stain jitter]

EvalPipeline is the only code that turns an image into model input: a run's validation and test
images, the Predict page, the command line and Grad-CAM all go through it, and it travels inside
the model file (`to_dict`), so prediction needs neither the database nor the reference image.
Both take and return HxWx3 uint8 arrays (an image may also be a PIL image); tensors are the
predictor's business (core/inference/predict.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image as PILImage

from core.errors import UserError
from core.progress import StageCallback
from core.transforms.augment import AugmentParams, expand
from core.transforms.stain import hed_jitter, normaliser_from_params
from core.transforms.tiles import cut_tiles

Progress = StageCallback  # (stage, done, total): core/progress.py's, by the name its callers import

# Keeps the jitter's random stream apart from other uses of the run seed.
_JITTER_STREAM = 0x48454A


def resize(image: PILImage.Image, size: int) -> PILImage.Image:
    # The paper squashes every image to 224x224 (aspect ratio not kept); we do the same.
    return image.resize((size, size), PILImage.BILINEAR)


def _as_rgb(image: PILImage.Image | np.ndarray) -> PILImage.Image:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        return PILImage.fromarray(image, "RGB")
    return image.convert("RGB")


def _threaded(
    fn: Callable[[int], np.ndarray], n: int, stage: str, progress: Progress | None, every: int, workers: int
) -> list[np.ndarray]:
    """fn(0..n-1) on a thread per core (NumPy releases the GIL), in order, reporting progress."""
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for a in pool.map(fn, range(n)):
            out.append(a)
            if progress and (len(out) % every == 0 or len(out) == n):
                progress(stage, len(out), n)
    return out


class EvalPipeline:
    """Image -> model input at evaluation and prediction.

    Args:
        image_size: the side of every sample, in pixels.
        tiles: 0 to resize the whole image; N > 0 for up to N tiles at native resolution.
        stain: "none", "macenko" or "reinhard".
        stain_params: the fitted normaliser's `to_params()`; None while the reference is still to
            be chosen (`with_stain` gives the fitted pipeline).
        tta: whether the predictor averages over the four flips (core/training/loop.py).
        workers: threads for stain normalisation (default: one per core).
    """

    def __init__(
        self,
        *,
        image_size: int,
        tiles: int = 0,
        stain: str = "none",
        stain_params: dict[str, Any] | None = None,
        tta: bool = False,
        workers: int | None = None,
    ):
        if stain != "none" and stain_params is not None and stain_params.get("method") != stain:
            raise UserError(f"Stain parameters of {stain_params.get('method')!r} given for {stain!r} normalisation.")
        self.image_size, self.tiles, self.stain, self.tta = int(image_size), int(tiles), stain, bool(tta)
        self.stain_params = None if stain == "none" else stain_params
        self.normaliser = None if self.stain_params is None else normaliser_from_params(self.stain_params)
        self.workers = workers or os.cpu_count() or 1

    @property
    def fitted(self) -> bool:
        """False while stain normalisation waits for its reference."""
        return self.stain == "none" or self.normaliser is not None

    @property
    def cache_key(self) -> str:
        """Names the geometric step (resize or tiles), the part of the pipeline worth caching."""
        return f"tiles-{self.image_size}-{self.tiles}" if self.tiles else str(self.image_size)

    def with_stain(self, params: dict[str, Any]) -> EvalPipeline:
        """This pipeline with the normaliser fitted to the run's reference (`Normaliser.to_params()`)."""
        return EvalPipeline(**{**self.to_dict(), "stain_params": params}, workers=self.workers)

    def samples(self, image: PILImage.Image | np.ndarray) -> np.ndarray:
        """The geometric step: (n, S, S, 3) uint8, one sample for a whole image, n tiles otherwise."""
        image = _as_rgb(image)
        if self.tiles:
            return cut_tiles(image, self.image_size, self.tiles)
        return np.asarray(resize(image, self.image_size), dtype=np.uint8)[None]

    def prepare(self, samples: Sequence[np.ndarray], progress: Progress | None = None) -> list[np.ndarray]:
        """The colour step: each sample stain-normalised (as they are without normalisation)."""
        if self.normaliser is None:
            if not self.fitted:
                raise ValueError("stain normalisation has no reference yet; call with_stain first")
            return list(samples)
        normaliser = self.normaliser
        return _threaded(
            lambda i: normaliser(samples[i]), len(samples), "stain normalisation", progress, 16, self.workers
        )

    def __call__(self, images: Sequence[PILImage.Image | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Model input for `images`: (N, S, S, 3) uint8 samples and each sample's image index (N,)."""
        cuts = [self.samples(image) for image in images]
        owners = np.repeat(np.arange(len(cuts)), [len(cut) for cut in cuts])
        flat = [a for cut in cuts for a in cut]
        if not flat:
            return np.empty((0, self.image_size, self.image_size, 3), dtype=np.uint8), owners
        return np.stack(self.prepare(flat)), owners

    def whole(self, image: PILImage.Image | np.ndarray) -> np.ndarray:
        """The whole image resized and normalised, (S, S, 3): what Grad-CAM explains (for a tiled run
        too, which then sees the image at a coarser scale than its tiles)."""
        return self.prepare([np.asarray(resize(_as_rgb(image), self.image_size), dtype=np.uint8)])[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `EvalPipeline(**d)` rebuilds it (the model file keeps it)."""
        return {
            "image_size": self.image_size,
            "tiles": self.tiles,
            "stain": self.stain,
            "stain_params": self.stain_params,
            "tta": self.tta,
        }


class TrainPipeline:
    """Prepared training samples (EvalPipeline's output) -> the augmented training set.

    Args:
        per_class: augmented images made for each class.
        augment: the Augmentor settings.
        seed: the run seed; the same seed gives the same images.
        hed_jitter: sigma = bias of the HED stain jitter on each augmented image; 0 = off.
        workers: processes for augmentation, threads for the jitter (default: one per core).
    """

    def __init__(
        self, *, per_class: int, augment: AugmentParams, seed: int, hed_jitter: float = 0.0, workers: int | None = None
    ):
        self.per_class, self.params, self.seed = per_class, augment, seed
        self.hed_jitter, self.workers = float(hed_jitter), workers or os.cpu_count() or 1

    def __call__(
        self, samples: Sequence[np.ndarray], labels: Sequence[int], num_classes: int, progress: Progress | None = None
    ) -> tuple[list[np.ndarray], list[int]]:
        images, out_labels, _ = self.augment(samples, labels, num_classes, progress)
        return self.jitter(images, progress), out_labels

    def augment(
        self, samples: Sequence[np.ndarray], labels: Sequence[int], num_classes: int, progress: Progress | None = None
    ) -> tuple[list[np.ndarray], list[int], list[int]]:
        """(images, labels, index of each one's source sample)."""
        cb = (lambda done, total: progress("augment", done, total)) if progress else None
        images, out_labels, sources = expand(
            [PILImage.fromarray(a) for a in samples],
            list(labels),
            self.per_class,
            self.params,
            self.seed,
            progress=cb,
            num_classes=num_classes,
            workers=self.workers,
        )
        return [np.asarray(im, dtype=np.uint8) for im in images], out_labels, sources

    def jitter(self, samples: Sequence[np.ndarray], progress: Progress | None = None) -> list[np.ndarray]:
        """HED jitter of each augmented image, each with its own generator seeded by (run seed, index)."""
        if self.hed_jitter <= 0 or not samples:
            return list(samples)
        value, seed = self.hed_jitter, self.seed % 2**63

        def one(i: int) -> np.ndarray:
            return hed_jitter(samples[i], np.random.default_rng((seed, _JITTER_STREAM, i)), sigma=value, bias=value)

        return _threaded(one, len(samples), "stain jitter", progress, 64, self.workers)
