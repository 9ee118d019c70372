"""Synthetic whole-slide images for tests: pyramidal tiled TIFFs that OpenSlide opens as "generic-tiff".

A slide is a white canvas with rectangular regions, each filled by a `Fill` (a function of level-0
coordinates, so every level shows the same picture). Levels are written tile by tile from
generators, each lower level rendered from level 0 and shrunk by area averaging, so a slide is
never held in memory: a 100,000 x 80,000 slide that is mostly glass takes about two seconds and
80 MB of disk, a 40,000 x 30,000 one a third of a second. Glass tiles are one deflate-compressed
white tile written again and again (or, with `sparse=True`, left out, which OpenSlide reads as
transparent).

Compression is deflate (zlib) only: tifffile needs the imagecodecs package to write JPEG tiles, and
the tests need no more packages. Resolution tags give the microns per pixel (pixels per
centimetre, unit CENTIMETER), or are left out for a slide without one.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from tests.synthetic import synthetic_array

TILE = 256
PATCH = 64  # class textures are a mosaic of synthetic training-like images of this side
PATCHES = 48  # distinct images per class in the mosaic, each made once (they take ~1 ms)
# Deflate level of tissue tiles: 0 stores them in deflate's format unsqueezed, since noise-like texture
# hardly shrinks and squeezing it would take most of a test's time. The one glass tile is squeezed.
LEVEL = 0

# fill(x, y, w, h) -> (h, w, 3) uint8: the picture over that level-0 box.
Fill = Callable[[int, int, int, int], np.ndarray]


@dataclass(frozen=True)
class Region:
    """A rectangle of the slide, in level-0 pixels, and what fills it."""

    x: int
    y: int
    width: int
    height: int
    fill: Fill


@functools.cache
def _patch(label: str, index: int) -> np.ndarray:
    patch = synthetic_array(label, index, (PATCH, PATCH))
    patch.flags.writeable = False
    return patch


def class_texture(label: str) -> Fill:
    """The texture of a synthetic class (tests/synthetic.py): a mosaic of its images, fixed by position."""

    def fill(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        for py in range(y // PATCH, (y + h - 1) // PATCH + 1):
            for px in range(x // PATCH, (x + w - 1) // PATCH + 1):
                patch = _patch(label, (py * 7919 + px * 104_729) % PATCHES)
                x0, y0 = max(x, px * PATCH), max(y, py * PATCH)
                x1, y1 = min(x + w, (px + 1) * PATCH), min(y + h, (py + 1) * PATCH)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = patch[
                    y0 - py * PATCH : y1 - py * PATCH, x0 - px * PATCH : x1 - px * PATCH
                ]
        return out

    return fill


def solid(rgb: tuple[int, int, int]) -> Fill:
    """One colour."""
    return lambda x, y, w, h: np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3))


def dots(rgb: tuple[int, int, int], period: int, side: int) -> Fill:
    """Squares of `side` level-0 pixels in `rgb` on white, every `period` pixels across and down."""

    def fill(x: int, y: int, w: int, h: int) -> np.ndarray:
        on = ((np.arange(y, y + h) % period) < side)[:, None] & ((np.arange(x, x + w) % period) < side)[None, :]
        return np.where(on[..., None], np.array(rgb, np.uint8), np.uint8(255)).astype(np.uint8)

    return fill


def render(regions: Sequence[Region], x: int, y: int, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8 of the level-0 box: white with the regions drawn in order."""
    out = np.full((h, w, 3), 255, np.uint8)
    for r in regions:
        x0, y0 = max(x, r.x), max(y, r.y)
        x1, y1 = min(x + w, r.x + r.width), min(y + h, r.y + r.height)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = r.fill(x0, y0, x1 - x0, y1 - y0)
    return out


def _level_tile(regions: Sequence[Region], size: tuple[int, int], ds: int, tx: int, ty: int) -> np.ndarray | None:
    """The TILE x TILE tile at tile position (tx, ty) of the level `ds` times down; None if all glass."""
    bx, by = tx * TILE * ds, ty * TILE * ds  # the tile's level-0 box
    bw, bh = min(TILE * ds, size[0] - bx), min(TILE * ds, size[1] - by)
    hits = [(max(bx, r.x), max(by, r.y), min(bx + bw, r.x + r.width), min(by + bh, r.y + r.height)) for r in regions]
    hits = [b for b in hits if b[0] < b[2] and b[1] < b[3]]
    if not hits:
        return None
    # Render only the part with regions, widened to whole level pixels, then shrink it by area.
    lx0 = (min(b[0] for b in hits) - bx) // ds
    ly0 = (min(b[1] for b in hits) - by) // ds
    lx1 = math.ceil((max(b[2] for b in hits) - bx) / ds)
    ly1 = math.ceil((max(b[3] for b in hits) - by) / ds)
    part = render(regions, bx + lx0 * ds, by + ly0 * ds, (lx1 - lx0) * ds, (ly1 - ly0) * ds)
    if ds > 1:
        part = np.asarray(Image.fromarray(part, "RGB").reduce(ds))
    tile = np.full((TILE, TILE, 3), 255, np.uint8)
    tile[ly0:ly1, lx0:lx1] = part
    return tile


def _tiles(regions: Sequence[Region], size: tuple[int, int], ds: int, sparse: bool) -> Iterator[bytes]:
    """The level's tiles, deflate-compressed, row by row; glass as b'' (sparse) or one shared white tile."""
    white = b"" if sparse else zlib.compress(np.full((TILE, TILE, 3), 255, np.uint8).tobytes())
    level_w, level_h = math.ceil(size[0] / ds), math.ceil(size[1] / ds)
    for ty in range(math.ceil(level_h / TILE)):
        for tx in range(math.ceil(level_w / TILE)):
            tile = _level_tile(regions, size, ds, tx, ty)
            yield white if tile is None else zlib.compress(tile.tobytes(), LEVEL)


def write_slide(
    path: Path,
    width: int,
    height: int,
    regions: Sequence[Region] = (),
    *,
    mpp: float | None = 0.25,
    levels: int = 3,
    factor: int = 2,
    sparse: bool = False,
) -> Path:
    """Write a pyramidal tiled TIFF slide of width x height at `mpp` (None: no resolution tags).

    `levels` levels, each `factor` (2 or 4) times smaller than the one before; 256 px tiles, deflate.
    """
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k in range(levels):
            ds = factor**k
            shape = (math.ceil(height / ds), math.ceil(width / ds), 3)
            extra = {} if mpp is None else {"resolution": (1e4 / (mpp * ds),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(
                _tiles(regions, (width, height), ds, sparse),
                shape=shape,
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if k else 0,
                metadata=None,
                **extra,
            )
    return path


def two_region_slide(
    path: Path, left: str = "CLL", right: str = "FL", *, width: int = 6000, height: int = 3000, mpp: float = 0.25
) -> tuple[Path, Region, Region]:
    """A slide with `left`'s texture in a block on the left, `right`'s on the right, glass elsewhere.

    Each block is about a quarter of the slide's width and half its height, away from the edges.
    Returns the path and the two regions (level-0 pixels).
    """
    w, h = width // 4, height // 2
    a = Region(width // 10, height // 4, w, h, class_texture(left))
    b = Region(width - width // 10 - w, height // 4, w, h, class_texture(right))
    write_slide(path, width, height, (a, b), mpp=mpp)
    return path, a, b
