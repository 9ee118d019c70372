"""What a slide's prediction (core/slides/predict.py) is handed out as: a CSV of its tiles, GeoJSON
for QuPath, a heat map record for a page to draw over the thumbnail, and a JSON summary.

Positions are level-0 pixels, y down, as QuPath and OpenSlide count them. A tile spans the tiling's
step (tile_px * mpp / slide_mpp level-0 pixels), which need not be a whole number.

GeoJSON: one Polygon feature per tile (a closed ring of five points), with QuPath's properties:
`objectType` "tile" (QuPath's own kind for the squares of its "Create tiles" command: a detection,
so thousands load and draw fast and are not edited by a stray click, as annotations would be),
`classification` {"name", "color": [r, g, b]} (the predicted class, in the colour the pages give
it) and `measurements` {name: number} (each class's probability, pen and blur as 0/1), which QuPath
lists in its measurement tables and can colour the tiles by.

No plotly here: the pages draw the heat map.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from core.csv_export import write_csv
from core.slides.predict import SlidePrediction

# The pages' palette (pages/_common.py PALETTE), so that a class has one colour in QuPath and the app.
PALETTE = ("#8e3b7a", "#3b6e8e", "#d08c2e", "#4f9a5b", "#c0392b", "#6c5ce7", "#7f8c8d", "#16a085")


def class_colour(index: int) -> str:
    """The colour of the class at `index` in a model's classes, as #rrggbb."""
    return PALETTE[index % len(PALETTE)]


def _rgb(colour: str) -> list[int]:
    return [int(colour[i : i + 2], 16) for i in (1, 3, 5)]


def _level0(value: float) -> float | int:
    """A level-0 length as a whole number where it is one, else to 1/100 of a pixel."""
    return int(value) if float(value).is_integer() else round(float(value), 2)


def tile_header(pred: SlidePrediction) -> list[str]:
    return ["x", "y", "width", "height", "predicted", *pred.classes, "pen", "blurry"]


def tile_rows(pred: SlidePrediction) -> list[list[Any]]:
    """One row per tile, in tile_header's columns: its level-0 box, predicted class, each class's
    probability (of pred.kind), and pen ink and blur as 0/1."""
    width, height = _level0(pred.tiling.step_x), _level0(pred.tiling.step_y)
    winners = pred.tile_predicted
    return [
        [t.x, t.y, width, height, pred.classes[int(k)], *(round(float(p), 6) for p in row), int(t.pen), int(t.blurry)]
        for t, k, row in zip(pred.tiling.tiles, winners, pred.tile_probabilities)
    ]


def write_tile_csv(out: TextIO, pred: SlidePrediction) -> None:
    """The tiles as CSV (core/csv_export.py: no cell a spreadsheet would run as a formula)."""
    write_csv(out, tile_header(pred), tile_rows(pred))


def tile_csv(pred: SlidePrediction) -> str:
    out = io.StringIO()
    write_tile_csv(out, pred)
    return out.getvalue()


def _features(pred: SlidePrediction) -> Iterator[dict[str, Any]]:
    w, h = pred.tiling.step_x, pred.tiling.step_y
    colours = [_rgb(class_colour(k)) for k in range(len(pred.classes))]
    for t, k, row in zip(pred.tiling.tiles, pred.tile_predicted, pred.tile_probabilities):
        x0, y0, x1, y1 = t.x, t.y, _level0(t.x + w), _level0(t.y + h)
        measurements = {f"{c} probability": round(float(p), 6) for c, p in zip(pred.classes, row)}
        yield {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": pred.classes[int(k)], "color": colours[int(k)]},
                "measurements": {**measurements, "pen": int(t.pen), "blurry": int(t.blurry)},
            },
        }


def geojson(pred: SlidePrediction) -> dict[str, Any]:
    """A GeoJSON FeatureCollection that QuPath imports: one "tile" feature per tile (module docstring)."""
    return {"type": "FeatureCollection", "features": list(_features(pred))}


def write_geojson(out: TextIO, pred: SlidePrediction) -> None:
    """`geojson(pred)` written feature by feature, so a slide of many tiles is never one big string."""
    out.write('{"type":"FeatureCollection","features":[')
    for i, feature in enumerate(_features(pred)):
        out.write(("," if i else "") + json.dumps(feature, separators=(",", ":")))
    out.write("]}")


@dataclass(frozen=True, eq=False)
class HeatMap:
    """The tiles' verdicts on the tiling's grid, for drawing over the slide's thumbnail: cell (r, c)
    covers thumbnail pixels [c * cell_width, (c + 1) * cell_width) across and likewise down."""

    classes: tuple[str, ...]
    colours: tuple[str, ...]  # one per class, #rrggbb
    predicted: np.ndarray  # (rows, columns) float: the index of each tile's class; NaN where no tile
    probability: np.ndarray  # (rows, columns) float: that class's probability; NaN where no tile
    thumbnail_width: int  # the thumbnail the grid lies over (Tiling.thumbnail_width/height)
    thumbnail_height: int
    cell_width: float  # one tile, in thumbnail pixels
    cell_height: float
    kind: str  # "calibrated" or "raw"

    def box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of a cell, in thumbnail pixels."""
        return (
            col * self.cell_width,
            row * self.cell_height,
            (col + 1) * self.cell_width,
            (row + 1) * self.cell_height,
        )


def heat_map(pred: SlidePrediction) -> HeatMap:
    t = pred.tiling
    predicted = np.full((t.rows, t.columns), np.nan)
    probability = np.full((t.rows, t.columns), np.nan)
    if pred.n_tiles:
        rows = np.array([tile.row for tile in t.tiles])
        cols = np.array([tile.col for tile in t.tiles])
        winners = pred.tile_predicted
        predicted[rows, cols] = winners
        probability[rows, cols] = pred.tile_probabilities[np.arange(pred.n_tiles), winners]
    return HeatMap(
        classes=pred.classes,
        colours=tuple(class_colour(k) for k in range(len(pred.classes))),
        predicted=predicted,
        probability=probability,
        thumbnail_width=t.thumbnail_width,
        thumbnail_height=t.thumbnail_height,
        cell_width=t.step_x * t.thumbnail_width / t.slide_width,
        cell_height=t.step_y * t.thumbnail_height / t.slide_height,
        kind=pred.kind,
    )


def summary(pred: SlidePrediction) -> dict[str, Any]:
    """The slide's verdict and how it was reached, JSON-able."""
    info, t = pred.info, pred.tiling
    return {
        "slide": {
            "name": info.name,
            "width": info.width,
            "height": info.height,
            "mpp_x": info.mpp_x,
            "mpp_y": info.mpp_y,
            "mpp_given": info.mpp_given,
            "vendor": info.vendor,
            "objective_power": info.objective_power,
        },
        "run_id": pred.run_id,
        "model_sha256": pred.model_sha256,
        "scale": {"tile_px": pred.scale.tile_px, "mpp": pred.scale.mpp},
        "predicted": pred.predicted,
        "probabilities": dict(pred.probabilities),
        "probability_kind": pred.kind,
        "aggregation": "mean of the tiles' probabilities",
        "refer": pred.refer,
        "refer_threshold": pred.threshold,
        "refer_target": pred.refer_target,
        "tissue_share": dict(pred.tissue_share),
        "tiles": {
            "kept": pred.n_tiles,
            "dropped_background": t.dropped_background,
            "dropped_pale": t.dropped_pale,
            "pen": t.pen_count,
            "blurry": t.blurry_count,
            "columns": t.columns,
            "rows": t.rows,
            "width": _level0(t.step_x),
            "height": _level0(t.step_y),
        },
        "top_tiles": {
            c: [{"x": top.x, "y": top.y, "probability": round(top.probability, 6)} for top in tops]
            for c, tops in pred.top_tiles.items()
        },
        "seconds": round(pred.seconds, 3),
        "tiling_seconds": round(pred.tiling_seconds, 3),
        "tiles_per_second": round(pred.tiles_per_second, 2),
    }


def _shares(values: dict[str, float]) -> str:
    return ", ".join(f"{c} {v:.1%}" for c, v in values.items())


def verdict_lines(pred: SlidePrediction) -> list[str]:
    """The slide's verdict in a reader's words, line by line, as the command line prints it."""
    info, t = pred.info, pred.tiling
    if pred.refer is None:
        verdict = f"{pred.predicted} ({pred.label}; no refer verdict without calibration)"
    elif pred.refer:
        verdict = f"uncertain, refer (most likely {pred.predicted})"
    else:
        verdict = pred.predicted
    lines = [
        f"{info.name}: {verdict}",
        f"probabilities ({pred.label}, the mean of {pred.n_tiles} tiles'): {_shares(pred.probabilities)}",
    ]
    if pred.refer is not None:
        band = (
            "every slide is referred: no threshold reaches the target"
            if pred.threshold is None
            else f"a slide whose top probability is below {pred.threshold:.1%} is referred"
        )
        lines.append(
            f"refer band: {band} (aiming at {pred.refer_target:.0%} accuracy; chosen on the run's "
            "validation images, not on slides)"
        )
    lines += [
        f"tissue (share of tiles predicted as each class): {_shares(pred.tissue_share)}",
        f"tiles: {pred.n_tiles} of {pred.scale.tile_px} px at {pred.scale.mpp:g} um/px (run {pred.run_id}'s "
        f"scale), slide at {info.mpp:.4g} um/px ({'given' if info.mpp_given else 'from its file'}); "
        f"{t.pen_count} with pen ink, {t.blurry_count} blurred",
        f"time: {pred.seconds:.1f} s ({pred.tiles_per_second:.1f} tiles/s), of which tiling "
        f"{pred.tiling_seconds:.1f} s",
    ]
    return lines


def write_outputs(pred: SlidePrediction, folder: Path, stem: str) -> list[Path]:
    """STEM.tiles.csv, STEM.geojson and STEM.summary.json in `folder` (made if missing); their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.tiles.csv", folder / f"{stem}.geojson", folder / f"{stem}.summary.json"]
    with open(paths[0], "w", encoding="utf-8", newline="") as f:
        write_tile_csv(f, pred)
    with open(paths[1], "w", encoding="utf-8") as f:
        write_geojson(f, pred)
    paths[2].write_text(json.dumps(summary(pred), indent=1), encoding="utf-8")
    return paths
