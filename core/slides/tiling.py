"""A slide's tiles: a grid at a chosen scale over its tissue, and the kept tiles read back in batches.

`tile_slide` lays a grid of tile_px x tile_px tiles at `mpp` microns per pixel over the whole slide
(each cell spans tile_px * mpp / slide_mpp level-0 pixels), keeps as candidates the cells whose
area in the thumbnail's tissue mask is at least `min_tissue` tissue, then reads candidates in an
order shuffled by `seed` and checks each (tissue.check_tile): pale ones are dropped, the rest kept
until `max_tiles` are. Candidates left unread then are dropped as over the cap. So at most a few
more than `max_tiles` tiles are read however large the slide, the sample is spread at random over
all the tissue, and the same seed gives the same tiles.

The result, `Tiling`, is a typed record with a JSON form (to_dict/from_dict for a JSON column,
to_json/from_json as text). `iter_tiles` reads its kept tiles back in batches of a fixed size, so
memory stays bounded whatever the slide's size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from core.errors import UserError
from core.slides.reader import Slide, check_mpp
from core.slides.tissue import check_tile, tissue_mask

MIN_TILE_PX, MAX_TILE_PX = 32, 2048  # the model needs 32 px to reach its last block
THUMBNAIL_SIDE = 1024  # the tissue mask's resolution: a 100,000 px slide at ~100 level-0 px per mask pixel


@dataclass(frozen=True)
class Tile:
    """A kept tile: its grid cell, its level-0 top-left corner, and what its check reported."""

    col: int
    row: int
    x: int
    y: int
    pen: bool = False  # pen ink over more than tissue.PEN_MIN_FRACTION of it
    blurry: bool = False  # out of focus (tissue.BLUR_MAX_LAPLACIAN_VAR)


@dataclass(frozen=True)
class Tiling:
    """Which tiles of a slide are used, at what scale, and why the others are not."""

    tile_px: int  # each tile's side, in pixels at `mpp`
    mpp: float  # the tiles' microns per pixel
    step_x: float  # one tile's span in level-0 pixels: tile_px * mpp / slide_mpp_x
    step_y: float
    columns: int  # the grid over the whole slide (whole cells only)
    rows: int
    tiles: tuple[Tile, ...]  # kept, in grid order (row by row)
    dropped_background: int  # cells with too little tissue in the mask; never read
    dropped_pale: int  # candidates read and found mostly glass
    dropped_over_cap: int  # candidates not read: max_tiles were kept before them
    max_tiles: int  # the cap (0: none)
    seed: int
    slide_width: int  # level 0, for checking a slide against its tiling and for drawing
    slide_height: int
    slide_mpp_x: float
    slide_mpp_y: float
    thumbnail_width: int  # the thumbnail the mask was made on; a page draws tiles over one of this size
    thumbnail_height: int

    @property
    def thumbnail_scale(self) -> float:
        """Level-0 pixels per thumbnail pixel."""
        return self.slide_width / self.thumbnail_width

    def thumbnail_box(self, tile: Tile) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of a tile on the thumbnail, in thumbnail pixels."""
        sx = self.thumbnail_width / self.slide_width
        sy = self.thumbnail_height / self.slide_height
        return (tile.x * sx, tile.y * sy, (tile.x + self.step_x) * sx, (tile.y + self.step_y) * sy)

    @property
    def pen_count(self) -> int:
        return sum(t.pen for t in self.tiles)

    @property
    def blurry_count(self) -> int:
        return sum(t.blurry for t in self.tiles)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; the tiles as columns (x, y, col, row, pen, blurry lists), compact for many."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tiles"}
        data["tiles"] = {
            name: [getattr(t, name) for t in self.tiles] for name in ("col", "row", "x", "y", "pen", "blurry")
        }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tiling:
        columns = data["tiles"]
        tiles = tuple(
            Tile(col=int(c), row=int(r), x=int(x), y=int(y), pen=bool(p), blurry=bool(b))
            for c, r, x, y, p, b in zip(
                columns["col"],
                columns["row"],
                columns["x"],
                columns["y"],
                columns["pen"],
                columns["blurry"],
                strict=True,
            )
        )
        names = {f.name for f in dataclasses.fields(cls)} - {"tiles"}
        return cls(tiles=tiles, **{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Tiling:
        return cls.from_dict(json.loads(text))


def _cell_tissue(
    mask: np.ndarray, width: int, height: int, step_x: float, step_y: float, columns: int, rows: int
) -> np.ndarray:
    """(rows, columns) share of each grid cell's area that the mask calls tissue."""
    mh, mw = mask.shape
    # Summed-area table: any box's tissue in four lookups, for every cell at once.
    table = np.zeros((mh + 1, mw + 1), np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    xs = np.arange(columns + 1) * step_x * mw / width
    ys = np.arange(rows + 1) * step_y * mh / height
    x0 = np.clip(np.floor(xs[:-1]).astype(int), 0, mw - 1)
    x1 = np.clip(np.maximum(np.ceil(xs[1:]).astype(int), x0 + 1), 1, mw)
    y0 = np.clip(np.floor(ys[:-1]).astype(int), 0, mh - 1)
    y1 = np.clip(np.maximum(np.ceil(ys[1:]).astype(int), y0 + 1), 1, mh)
    total = table[y1][:, x1] - table[y0][:, x1] - table[y1][:, x0] + table[y0][:, x0]
    area = np.outer(y1 - y0, x1 - x0)
    return total / area


def _check_options(
    tile_px: int, mpp: float, max_tiles: int, min_saturation: float, max_pale_fraction: float, min_tissue: float
) -> float:
    if isinstance(tile_px, bool) or not isinstance(tile_px, int) or not MIN_TILE_PX <= tile_px <= MAX_TILE_PX:
        raise UserError(
            f"Tile size must be a whole number of pixels from {MIN_TILE_PX} to {MAX_TILE_PX}, got {tile_px!r}."
        )
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 0:
        raise UserError(f"Most tiles per slide must be a whole number, 0 for no limit, got {max_tiles!r}.")
    for name, value in (("TISSUE_MIN_SATURATION", min_saturation), ("TISSUE_MAX_PALE_FRACTION", max_pale_fraction)):
        if not 0.0 <= value <= 1.0:  # also refuses NaN
            raise UserError(f"{name} must be a number from 0 to 1, got {value!r}.")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be 0..1, got {min_tissue}")
    return check_mpp(mpp, "Tile microns per pixel")


def tile_slide(
    slide: Slide,
    tile_px: int = 224,
    mpp: float = 0.5,
    max_tiles: int = 256,
    seed: int = 0,
    *,
    min_saturation: float = 0.05,
    max_pale_fraction: float = 0.6,
    min_tissue: float = 0.25,
    thumbnail_side: int = THUMBNAIL_SIDE,
) -> Tiling:
    """The tiles of `slide` to use: tile_px pixels at `mpp` microns per pixel, over its tissue.

    Defaults mirror the settings SLIDE_TILE_PX, SLIDE_MPP, SLIDE_MAX_TILES, TISSUE_MIN_SATURATION
    and TISSUE_MAX_PALE_FRACTION; callers pass the settings' values. `max_tiles` 0 keeps every
    tissue tile. A cell is a candidate when at least `min_tissue` of its area is tissue in the mask.
    UserError for a tile size, scale or cap out of range. A slide with no tissue gives no tiles.
    """
    mpp = _check_options(tile_px, mpp, max_tiles, min_saturation, max_pale_fraction, min_tissue)
    info = slide.info
    step_x, step_y = tile_px * mpp / info.mpp_x, tile_px * mpp / info.mpp_y
    columns, rows = int(info.width // step_x), int(info.height // step_y)
    thumbnail = slide.thumbnail(thumbnail_side)
    if columns and rows:
        tissue = _cell_tissue(
            tissue_mask(thumbnail, min_saturation), info.width, info.height, step_x, step_y, columns, rows
        )
        cand_rows, cand_cols = np.nonzero(tissue >= max(min_tissue, 1e-9))
    else:
        cand_rows = cand_cols = np.zeros(0, int)
    order = np.random.default_rng(seed).permutation(len(cand_rows))
    kept: list[Tile] = []
    pale = read = 0
    for i in order:
        if max_tiles and len(kept) == max_tiles:
            break
        read += 1
        col, row = int(cand_cols[i]), int(cand_rows[i])
        x, y = round(col * step_x), round(row * step_y)
        found = check_tile(slide.region(x, y, tile_px, mpp), min_saturation, max_pale_fraction)
        if found.pale:
            pale += 1
        else:
            kept.append(Tile(col=col, row=row, x=x, y=y, pen=found.pen, blurry=found.blurry))
    kept.sort(key=lambda t: (t.row, t.col))
    return Tiling(
        tile_px=tile_px,
        mpp=mpp,
        step_x=step_x,
        step_y=step_y,
        columns=columns,
        rows=rows,
        tiles=tuple(kept),
        dropped_background=columns * rows - len(cand_rows),
        dropped_pale=pale,
        dropped_over_cap=len(cand_rows) - read,
        max_tiles=max_tiles,
        seed=seed,
        slide_width=info.width,
        slide_height=info.height,
        slide_mpp_x=info.mpp_x,
        slide_mpp_y=info.mpp_y,
        thumbnail_width=thumbnail.width,
        thumbnail_height=thumbnail.height,
    )


class TileBatch(NamedTuple):
    """Up to `batch` kept tiles: the tiles and their pixels, (n, tile_px, tile_px, 3) uint8."""

    tiles: tuple[Tile, ...]
    pixels: np.ndarray


def iter_tiles(slide: Slide, tiling: Tiling, batch: int = 32) -> Iterator[TileBatch]:
    """The kept tiles of `tiling`, read from `slide` at the tiling's scale, `batch` at a time in grid order.

    Only one batch is in memory at a time. ValueError when the slide is not the one tiled (another
    size or microns per pixel, so the positions would point elsewhere).
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    info = slide.info
    same = (
        (info.width, info.height) == (tiling.slide_width, tiling.slide_height)
        and math.isclose(info.mpp_x, tiling.slide_mpp_x)
        and math.isclose(info.mpp_y, tiling.slide_mpp_y)
    )
    if not same:
        raise ValueError(f"{info.name} is not the slide this tiling was made on")
    for start in range(0, len(tiling.tiles), batch):
        tiles = tiling.tiles[start : start + batch]
        pixels = np.stack([np.asarray(slide.region(t.x, t.y, tiling.tile_px, tiling.mpp)) for t in tiles])
        yield TileBatch(tiles, pixels)
