"""Decoded, resized images as uint8 arrays, cached on disk by content hash and size.

Decoding a 1388x1040 TIF and resizing it costs ~9 ms; augmenting at full size costs 0.2 s. So every
image is decoded and resized to the training size once, here, before augmentation, and the result
is kept under APP_HOME/cache keyed by (sha256, size): new bytes or a new size is a new key, so a
stale entry can never be read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from core.transforms import tiles
from core.config import Settings
from core.data.datasets import image_path, load_rgb
from core.store.db import Image


def resize(image: PILImage.Image, size: int) -> PILImage.Image:
    # The paper squashes every image to 224x224 (aspect ratio not kept); we do the same.
    return image.resize((size, size), PILImage.BILINEAR)


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


def resized_array(settings: Settings, image: Image, size: int) -> np.ndarray:
    """The image as a (size, size, 3) uint8 array, from the cache when present."""
    return _cached(_cache_path(settings, image.sha256, str(size)),
                   lambda: np.asarray(resize(load_rgb(image_path(settings, image)), size), dtype=np.uint8))


def tile_array(settings: Settings, image: Image, size: int, max_tiles: int) -> np.ndarray:
    """The image's tiles at native resolution (core/transforms/tiles.py), (n, size, size, 3) uint8, cached."""
    return _cached(_cache_path(settings, image.sha256, f"tiles-{size}-{max_tiles}"),
                   lambda: tiles.cut_tiles(load_rgb(image_path(settings, image)), size, max_tiles))


def load_arrays(
    settings: Settings,
    images: Sequence[Image],
    size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    out = []
    for i, image in enumerate(images):
        out.append(resized_array(settings, image, size))
        if progress:
            progress(i + 1, len(images))
    return out


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8 arrays -> (N, 3, H, W) uint8 tensor; normalised later, on the device."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
