"""What the Datasets page shows of a dataset's scale and of its whole slides, as typed records.

`dataset_scale` is the scale a dataset's images were ingested at (tiles of tile_px pixels at tile_mpp
microns per pixel cut from slides, or field images with the microns per pixel given at ingest).
`dataset_slides` lists the slides a dataset's tiles were cut from (core.store.db.Slide) with their
tiling's counts, and says whether each slide's file is still on the server as it was ingested (its
size and modification time; `python -m core check` compares the content). `tiling_picture` lays one
slide's kept tiles over its thumbnail, read from the file where it lies; without that file, over a
blank canvas of the slide's shape. Nothing here writes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.data.datasets import get_dataset
from core.errors import UserError
from core.slides.reader import open_slide
from core.slides.tiling import Tile, Tiling
from core.store.db import Slide

PICTURE_SIDE = 1024  # the longer side of a tiling's picture, in pixels (the tissue mask's own resolution)

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in picture pixels


@dataclass(frozen=True)
class DatasetScale:
    """The scale of a dataset's images: tiles of `tile_px` at `mpp` microns per pixel cut from slides
    (tile_px set), field images at `mpp` (tile_px None), or unknown (both None)."""

    tile_px: int | None
    mpp: float | None

    @property
    def words(self) -> str | None:
        """The scale in a few words; None where it is unknown."""
        if self.tile_px is not None and self.mpp is not None:
            return f"tiles of {self.tile_px} px at {self.mpp:g} µm per pixel"
        if self.mpp is not None:
            return f"{self.mpp:g} µm per pixel"
        return None


class SlideFile(enum.Enum):
    """Where a slide's file is now, compared with its record."""

    PRESENT = "present"  # at its recorded path, with the size and modification time it had at ingest
    CHANGED = "changed"  # at its recorded path, but another size or modification time
    MISSING = "missing"  # recorded path, and nothing there any more
    UPLOADED = "uploaded"  # no path: an uploaded copy, removed once its tiles were stored


@dataclass(frozen=True)
class SlideSummary:
    """One slide of a dataset as the Datasets page lists it."""

    id: int
    file_name: str
    label: str
    width: int  # level 0, in pixels
    height: int
    mpp: float  # microns per level-0 pixel
    vendor: str
    sha256: str  # of the file as ingested
    tiling: Tiling
    file: SlideFile
    source_path: str | None  # where it lay on the server at ingest; for reading it, never for showing

    @property
    def tiles_kept(self) -> int:
        return len(self.tiling.tiles)


@dataclass(frozen=True)
class TilingPicture:
    """A slide's kept tiles as boxes over its picture: the thumbnail, or None for a blank canvas of
    width x height, with `note` saying why there is no thumbnail."""

    width: int
    height: int
    thumbnail: np.ndarray | None  # (height, width, 3) uint8
    clean: tuple[Box, ...]  # kept tiles without a flag
    pen: tuple[Box, ...]  # kept tiles with pen ink on them
    blurry: tuple[Box, ...]  # kept tiles out of focus (and without pen ink)
    note: str


def dataset_scale(session: Session, name: str) -> DatasetScale:
    """The scale dataset `name` was ingested at; UserError for an unknown name."""
    dataset = get_dataset(session, name)
    return DatasetScale(dataset.tile_px, dataset.tile_mpp)


def dataset_slides(session: Session, name: str) -> tuple[SlideSummary, ...]:
    """The slides of dataset `name`, by class then file name; empty for a dataset of field images."""
    dataset = get_dataset(session, name)
    rows = session.scalars(select(Slide).where(Slide.dataset_id == dataset.id).order_by(Slide.label, Slide.file_name))
    return tuple(
        SlideSummary(
            id=row.id,
            file_name=row.file_name,
            label=row.label,
            width=row.width,
            height=row.height,
            mpp=row.mpp,
            vendor=row.vendor,
            sha256=row.sha256,
            tiling=Tiling.from_json(row.tiling),
            file=_file_state(row),
            source_path=row.source_path,
        )
        for row in rows
    )


def _file_state(row: Slide) -> SlideFile:
    if row.source_path is None:
        return SlideFile.UPLOADED
    try:
        found = Path(row.source_path).stat()
    except OSError:
        return SlideFile.MISSING
    # A quick look, as `python -m core check` takes first: a file whose size and time are unchanged is the
    # one ingested; hashing a slide of gigabytes for every page view would be too slow.
    same = found.st_size == row.size_bytes and found.st_mtime == row.mtime
    return SlideFile.PRESENT if same else SlideFile.CHANGED


_NOTES = {
    SlideFile.UPLOADED: "The slide file is not on the server: it was uploaded, and only its tiles were kept. "
    "The tiles are drawn on a blank canvas of the slide's shape.",
    SlideFile.MISSING: "The slide file is not on the server any more (it was moved or removed since it was "
    "ingested). The tiles are drawn on a blank canvas of the slide's shape.",
    SlideFile.CHANGED: "The slide file on the server has changed since it was ingested, so its picture may not "
    "match these tiles; they are drawn on a blank canvas of the slide's shape.",
}


def tiling_picture(slide: SlideSummary, side: int = PICTURE_SIDE) -> TilingPicture:
    """`slide`'s kept tiles over its thumbnail (longer side `side` pixels), read from its file when
    that is on the server as ingested; else over a blank canvas of the slide's proportions."""
    thumbnail, note = None, _NOTES.get(slide.file, "")
    if slide.file is SlideFile.PRESENT and slide.source_path is not None:
        try:  # the recorded mpp: the file may record none, given at ingest
            with open_slide(Path(slide.source_path), slide.mpp) as opened:
                thumbnail = np.asarray(opened.thumbnail(side).convert("RGB"))
        except UserError as exc:
            note = f"The slide file could not be read ({exc}); the tiles are drawn on a blank canvas."
    if thumbnail is not None:
        height, width = thumbnail.shape[:2]
    else:
        scale = side / max(slide.width, slide.height)
        width, height = max(1, round(slide.width * scale)), max(1, round(slide.height * scale))
    sx, sy = width / slide.width, height / slide.height
    tiling = slide.tiling

    def box(tile: Tile) -> Box:
        return (tile.x * sx, tile.y * sy, (tile.x + tiling.step_x) * sx, (tile.y + tiling.step_y) * sy)

    return TilingPicture(
        width=width,
        height=height,
        thumbnail=thumbnail,
        clean=tuple(box(t) for t in tiling.tiles if not (t.pen or t.blurry)),
        pen=tuple(box(t) for t in tiling.tiles if t.pen),
        blurry=tuple(box(t) for t in tiling.tiles if t.blurry and not t.pen),
        note=note,
    )
