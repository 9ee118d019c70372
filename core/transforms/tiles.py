"""Tiles at native resolution, and the tile vote.

Resizing a 1388x1040 image to 224x224 keeps 1 pixel in 29: nuclei, whose shape and chromatin tell
the subtypes apart, shrink to a few pixels. With tiles (RunConfig.tiles = N > 0) a run instead cuts
up to N non-overlapping squares of `image_size` pixels from each image at its own resolution, trains
on them (each labelled with its image's class), and predicts an image by the mean of its tiles'
probabilities (a soft vote). Train, validation and test tiles of one image always stay together on
its side of the split, because tiles are cut after splitting.
"""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage


def tile_boxes(width: int, height: int, size: int, max_tiles: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the tiles of a width x height image, row by row.

    The grid of whole size x size squares, centred (the margins are split evenly); when it has more
    than `max_tiles`, that many evenly spaced along it. An image smaller than `size` on a side has one
    tile: the whole image (resized to `size` by `cut_tiles`).
    """
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be at least 1, got {max_tiles}")
    nx, ny = width // size, height // size
    if nx == 0 or ny == 0:
        return [(0, 0, width, height)]
    left, top = (width - nx * size) // 2, (height - ny * size) // 2
    boxes = [
        (left + i * size, top + j * size, left + (i + 1) * size, top + (j + 1) * size)
        for j in range(ny)
        for i in range(nx)
    ]
    if len(boxes) > max_tiles:
        picks = np.unique(np.linspace(0, len(boxes) - 1, max_tiles).round().astype(int))
        boxes = [boxes[i] for i in picks]
    return boxes


def cut_tiles(image: PILImage.Image, size: int, max_tiles: int) -> np.ndarray:
    """(n, size, size, 3) uint8 tiles of an RGB image."""
    image = image.convert("RGB")
    out = []
    for box in tile_boxes(image.width, image.height, size, max_tiles):
        tile = image.crop(box)
        if tile.size != (size, size):
            tile = tile.resize((size, size), PILImage.BILINEAR)
        out.append(np.asarray(tile, dtype=np.uint8))
    return np.stack(out)


def vote(tile_probs: np.ndarray, owners: np.ndarray, n_images: int) -> np.ndarray:
    """(n_images, C) mean of the tile probabilities of each image; owners[i] is tile i's image."""
    tile_probs = np.asarray(tile_probs, dtype=np.float64)
    owners = np.asarray(owners, dtype=int)
    sums = np.zeros((n_images, tile_probs.shape[1]))
    np.add.at(sums, owners, tile_probs)
    counts = np.bincount(owners, minlength=n_images)
    if (counts == 0).any():
        raise ValueError("every image needs at least one tile")
    return sums / counts[:, None]
