"""The scale a model was trained at, as its model file records it.

A model trained on tiles cut from whole slides learned tissue at one physical scale: tiles of
`tile_px` pixels at `mpp` microns per pixel. Prediction on a slide must cut its tiles the same way,
so the run writes that scale into its model file's description under "scale" (`scale_meta`), and
slide prediction reads it back from the description alone (`model_scale`), without the database.

A dataset of microscope fields given a microns per pixel at ingest records only the mpp
({"tile_px": null, "mpp": ...}): its images have no fixed size in pixels, so there is no tile
scale to reproduce and `model_scale` answers None for it, as for a model without "scale".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

META_KEY = "scale"


@dataclass(frozen=True)
class ModelScale:
    """Tiles of `tile_px` pixels on a side at `mpp` microns per pixel."""

    tile_px: int
    mpp: float


def scale_meta(tile_px: int | None, mpp: float | None) -> dict[str, Any]:
    """The model description's "scale" object: {"tile_px": ..., "mpp": ...} (either may be None)."""
    return {"tile_px": None if tile_px is None else int(tile_px), "mpp": None if mpp is None else float(mpp)}


def model_scale(meta: dict[str, Any]) -> ModelScale | None:
    """The tile scale a model description records, or None when it records none (a model trained on
    microscope fields, a model file from before scales were recorded, or a malformed entry)."""
    scale = meta.get(META_KEY) if isinstance(meta, dict) else None
    if not isinstance(scale, dict):
        return None
    tile_px, mpp = scale.get("tile_px"), scale.get("mpp")
    if isinstance(tile_px, bool) or not isinstance(tile_px, int) or tile_px <= 0:
        return None
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
        return None
    return ModelScale(tile_px=tile_px, mpp=float(mpp))
