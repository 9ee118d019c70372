"""Decoded, resized images as uint8 arrays, cached on disk by content hash and size.

Decoding a 1388x1040 TIF and resizing it costs ~9 ms; augmenting at full size costs 0.2 s. So every
image is decoded and resized to the training size once, here, before augmentation, and the result
is kept under APP_HOME/cache keyed by (sha256, size): new bytes or a new size is a new key, so a
stale entry can never be read. What is cached is the evaluation pipeline's geometric step
(`EvalPipeline.samples`: resize, or tiles), so cached and uncached images are prepared alike.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.config import Settings
from core.data.datasets import image_path
from core.data.decoding import load_rgb
from core.store.db import Image
from core.transforms.pipelines import EvalPipeline

if TYPE_CHECKING:  # torch is imported by to_tensor: the pages read the cache without loading it
    import torch


def _cache_path(settings: Settings, sha256: str, kind: str) -> Path:
    return settings.app_home / "cache" / kind / sha256[:2] / f"{sha256}.npy"


def _cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    if path.exists():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    array = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return array


def image_samples(settings: Settings, image: Image, pipeline: EvalPipeline) -> np.ndarray:
    """`pipeline.samples` of a stored image, (n, S, S, 3) uint8, from the cache when present."""
    array = _cached(
        _cache_path(settings, image.sha256, pipeline.cache_key),
        lambda: pipeline.samples(load_rgb(image_path(settings, image))),
    )
    return array if array.ndim == 4 else array[None]  # whole images were once cached as (S, S, 3)


def resized_array(settings: Settings, image: Image, size: int) -> np.ndarray:
    """The image as a (size, size, 3) uint8 array, from the cache when present."""
    return image_samples(settings, image, EvalPipeline(image_size=size))[0]


def load_samples(
    settings: Settings,
    images: Sequence[Image],
    pipeline: EvalPipeline,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[np.ndarray], list[int]]:
    """The samples of `images` (one per whole image, or each image's tiles) and each one's image index."""
    arrays: list[np.ndarray] = []
    owners: list[int] = []
    for i, image in enumerate(images):
        cut = image_samples(settings, image, pipeline)
        arrays.extend(cut)
        owners.extend([i] * len(cut))
        if progress:
            progress(i + 1, len(images))
    return arrays, owners


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8 arrays -> (N, 3, H, W) uint8 tensor; normalised later, on the device."""
    import torch

    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
