"""Where a slide's tissue is, and what is wrong with one tile.

`tissue_mask` follows the recipe CLAM, Slideflow and WSInfer share: stained tissue is coloured and
glass is grey or white, so threshold the HSV saturation of the thumbnail, median-blurred (7 px) to
ignore dust and noise, at Otsu's threshold (the split of the histogram that best separates two
classes). The threshold never goes below the pale limit `min_saturation`, so a blank slide, whose
only "classes" are noise, gives no tissue.

`check_tile` looks at one tile read at the working scale: it is pale (mostly glass, dropped by the
tiling) when more than `max_pale_fraction` of its pixels have saturation below `min_saturation`; it
has pen ink or is blurred by the rules below, which are reported, not used to drop the tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

MEDIAN_PX = 7
# Pen ink: green to blue hues (90-235 degrees) at high saturation, or near-black. H&E has no green,
# and haematoxylin's blue-purple lies at 240-330 degrees, eosin's pink at 300-360 and 0-20.
PEN_HUES_DEG = (90.0, 235.0)
PEN_MIN_SATURATION = 0.4
PEN_MAX_BLACK_VALUE = 0.15  # brightness (HSV value) below this is black ink; stained tissue is lighter
PEN_MIN_FRACTION = 0.05  # a tile with at least this share of ink pixels is marked
# Variance of the Laplacian of the grey tile (0-255) below this: out of focus. In-focus tissue at
# 0.5 um/px measures in the hundreds or more; a tile blurred by a few pixels falls near zero.
BLUR_MAX_LAPLACIAN_VAR = 40.0


def _hsv(image: Image.Image | np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 HSV of an RGB image or array; each channel 0-255 (hue: 255 is 360 degrees)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    return np.asarray(image.convert("RGB").convert("HSV"))


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t for which `values > t` best splits them into two classes."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(p)  # share of the lower class for each t
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = -1.0  # t with an empty class
    return int(np.argmax(between)) if between.max() > 0 else int(np.max(values, initial=0))


def tissue_mask(thumbnail: Image.Image, min_saturation: float = 0.05) -> np.ndarray:
    """(h, w) bool array of the thumbnail: True where there is tissue."""
    saturation = Image.fromarray(_hsv(thumbnail)[..., 1], "L").filter(ImageFilter.MedianFilter(MEDIAN_PX))
    s = np.asarray(saturation)
    floor = min_saturation * 255.0
    return (s > otsu_threshold(s)) & (s >= floor)


@dataclass(frozen=True)
class TileCheck:
    """One tile's findings: each measure and whether it crosses its limit."""

    pale_fraction: float  # share of pixels with saturation below the pale limit
    pale: bool
    pen_fraction: float  # share of pixels that look like pen ink
    pen: bool
    sharpness: float  # variance of the Laplacian of the grey tile
    blurry: bool


def _sharpness(grey: np.ndarray) -> float:
    g = grey.astype(np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var()) if lap.size else 0.0


def _pen_fraction(hsv: np.ndarray) -> float:
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 255.0)
    sat = hsv[..., 1] / 255.0
    value = hsv[..., 2] / 255.0
    coloured = (sat >= PEN_MIN_SATURATION) & (value >= PEN_MAX_BLACK_VALUE)
    ink = coloured & (hue >= PEN_HUES_DEG[0]) & (hue <= PEN_HUES_DEG[1])
    return float((ink | (value < PEN_MAX_BLACK_VALUE)).mean())


def check_tile(
    tile: Image.Image | np.ndarray, min_saturation: float = 0.05, max_pale_fraction: float = 0.6
) -> TileCheck:
    """Check one RGB tile (PIL image or (h, w, 3) uint8 array) for glass, pen ink and blur."""
    hsv = _hsv(tile)
    pale_fraction = float((hsv[..., 1] < min_saturation * 255.0).mean())
    pen_fraction = _pen_fraction(hsv)
    grey = np.asarray(
        Image.fromarray(np.asarray(tile, dtype=np.uint8), "RGB").convert("L")
        if isinstance(tile, np.ndarray)
        else tile.convert("L")
    )
    sharpness = _sharpness(grey)
    return TileCheck(
        pale_fraction=pale_fraction,
        pale=pale_fraction > max_pale_fraction,
        pen_fraction=pen_fraction,
        pen=pen_fraction >= PEN_MIN_FRACTION,
        sharpness=sharpness,
        blurry=sharpness < BLUR_MAX_LAPLACIAN_VAR,
    )
