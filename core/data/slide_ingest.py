"""Datasets of whole-slide images: each slide tiled, its tiles ingested as images grouped by slide.

The layout is that of images, one sub-folder per class::

    root/CLL/patient-01.svs
    root/FL/patient-07.ndpi

Each slide is tiled at one physical scale (core/slides/tiling.py: tile_px pixels at tile_mpp microns
per pixel, up to max_tiles over its tissue, seeded), and its kept tiles are written as PNG into a
work folder under APP_HOME/tmp as CLASS/STEM__X_Y.png, with a groups CSV that gives every tile its
slide's file name as its group. That folder goes through the ordinary ingest (core/data/ingest.py),
so tiles are checked and stored by content like any image, and every split keeps a slide's tiles
together (groups given, not estimated). Tiles are read in bounded batches, never a whole slide.

All or nothing: every slide is opened, hashed and tiled into the work folder before anything is
stored, so a slide that is damaged, cut short, without tissue or without a microns per pixel is a
UserError naming it, and the dataset is left as it was. The work folder is removed afterwards.

Each slide is recorded (core.store.db.Slide: where it lay, size, mtime, sha256, scale, tiling) and
the dataset records its tiles' scale (tile_px, tile_mpp), which a model trained on it writes into
its model file (core/slides/scale.py). Slides live in folders: a .zip of slides is not unpacked
here (they are large, and a copy would only be tiled and removed).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_disk, check_name_length
from core.config import Settings
from core.data.decoding import IMAGE_EXTENSIONS
from core.data.groups import write_manifest
from core.data.ingest import IngestReport, ingest
from core.data.sources import dataset_root, scan
from core.errors import UserError
from core.progress import ProgressCallback
from core.slides.reader import TIFF_SUFFIXES, Slide, check_mpp, is_slide_path, open_slide
from core.slides.tiling import MAX_TILE_PX, MIN_TILE_PX, Tiling, iter_tiles, tile_slide
from core.store.db import Dataset, SkippedFile
from core.store.db import Slide as SlideRow
from core.store.files import hold_ingest_lock

TILE_BATCH = 32  # tiles read from a slide at once: 32 x 224 x 224 x 3 bytes, under 5 MB
SEED = 0  # the tiles sampled from a slide; fixed, so ingesting the same slide again finds its tiles present


@dataclass(frozen=True)
class SourceFile:
    """A file found in the source: on disk, as CLASS/file in the source, and its class."""

    path: Path
    rel: str
    label: str

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class SlideScan:
    """What a folder of class sub-folders holds, sorted into slides and field images."""

    slides: tuple[SourceFile, ...]
    images: tuple[SourceFile, ...]  # ordinary images (microscope fields)
    skipped: tuple[tuple[str, str], ...]  # (CLASS/file, reason) of what is neither, or not read


@dataclass(frozen=True)
class TileScale:
    """How slides are tiled: tile_px pixels on a side at mpp microns per pixel, at most max_tiles each."""

    tile_px: int
    mpp: float
    max_tiles: int


@dataclass(frozen=True)
class TiledSlide:
    """A slide as tiled, before its record is stored."""

    file: SourceFile
    size_bytes: int
    mtime: float
    sha256: str
    mpp: float
    vendor: str
    width: int
    height: int
    tiling: Tiling


@dataclass(frozen=True)
class SlideIngestReport:
    """What ingesting a folder of slides did: the tiles' ingest, and each new slide with its tiles kept."""

    ingest: IngestReport
    slides: tuple[tuple[str, str, int], ...]  # (CLASS/file, class, tiles kept) of the slides tiled now
    already_present: tuple[str, ...]  # CLASS/file of slides already in the dataset, identical
    scale: TileScale
    skipped: tuple[tuple[str, str], ...]  # (CLASS/file, reason) in the source that is not a slide

    @property
    def tiles_kept(self) -> int:
        return sum(n for _, _, n in self.slides)


def scan_slides(folder: Path) -> SlideScan:
    """The slides and field images in the class folders of `folder` (a lone wrapper folder is
    descended into). A folder's sub-folder named as a slide's stem (MRXS keeps its data there) is
    part of that slide, not reported."""
    top = Path(folder).resolve()
    classes, candidates, passed = scan(dataset_root(Path(folder), top), top)
    slides: list[SourceFile] = []
    images: list[SourceFile] = []
    skipped: list[tuple[str, str]] = []
    for cand in candidates:
        if is_slide_path(cand.path):
            slides.append(SourceFile(cand.path, cand.rel, cand.label))
        elif cand.path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(SourceFile(cand.path, cand.rel, cand.label))
        else:
            skipped.append((cand.rel, "not a whole-slide image or an image"))
    stems = {s.rel.rsplit(".", 1)[0] + "/" for s in slides}
    skipped += [(rel, why) for rel, why in passed if rel not in stems]
    used = {f.label for f in slides + images}
    skipped += [
        (label + "/", "no whole-slide image in this class folder; class left out")
        for label in classes
        if label not in used
    ]
    return SlideScan(tuple(slides), tuple(images), tuple(sorted(skipped)))


def is_slide_folder(source: Path) -> bool:
    """Whether `source` is a folder of class sub-folders of whole-slide images (not of images).

    UserError for a folder that holds both; a .zip or a folder without slides is not one.
    """
    return _slide_scan(Path(source).expanduser()) is not None


def _slide_scan(source: Path) -> SlideScan | None:
    """What the folder `source` holds if it is one of slides; None if it is not (see is_slide_folder)."""
    if not source.is_dir():
        return None
    found = scan_slides(source)
    if found.slides and found.images:
        _refuse_mixed(source, found)
    return found if found.slides else None


def _refuse_mixed(source: Path, found: SlideScan) -> None:
    first = found.images[0]
    if all(f.path.suffix.lower() in TIFF_SUFFIXES for f in found.images):
        # A TIFF beside slides that OpenSlide does not take is most likely a slide cut short: say why.
        try:
            open_slide(first.path).close()
        except UserError as exc:
            raise UserError(
                f"{first.rel}: {exc} The other files of {source.name} are whole-slide images; "
                "a dataset is made of slides or of field images, not both."
            ) from None
    raise UserError(
        f"{source.name} holds both whole-slide images ({', '.join(s.rel for s in found.slides[:3])}) and field "
        f"images ({', '.join(f.rel for f in found.images[:3])}). Ingest them as two datasets: one of slides, "
        "one of images."
    )


def tile_scale(
    settings: Settings, tile_px: int | None = None, tile_mpp: float | None = None, max_tiles: int | None = None
) -> TileScale:
    """The tiling asked for, each value not given from the settings (SLIDE_TILE_PX, SLIDE_MPP,
    SLIDE_MAX_TILES); UserError for one out of range, or tiles smaller than MIN_IMAGE_SIDE."""
    px = settings.slide_tile_px if tile_px is None else tile_px
    cap = settings.slide_max_tiles if max_tiles is None else max_tiles
    if isinstance(px, bool) or not isinstance(px, int) or not MIN_TILE_PX <= px <= MAX_TILE_PX:
        raise UserError(f"Tile size must be a whole number of pixels from {MIN_TILE_PX} to {MAX_TILE_PX}, got {px!r}.")
    if px < settings.min_image_side:
        raise UserError(
            f"Tiles of {px} px are smaller than MIN_IMAGE_SIDE ({settings.min_image_side} px), "
            "below which ingest refuses an image; choose larger tiles."
        )
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise UserError(f"Most tiles per slide must be a whole number, 0 for no cap, got {cap!r}.")
    mpp = check_mpp(settings.slide_mpp if tile_mpp is None else tile_mpp, "Tile microns per pixel")
    return TileScale(px, mpp, cap)


def check_dataset_scale(session: Session, name: str, tile_px: int | None, tile_mpp: float | None) -> None:
    """UserError when dataset `name` exists with images at another scale than (tile_px, tile_mpp):
    one dataset holds images of one kind at one scale, which its models are trained at."""
    found = session.execute(select(Dataset.tile_px, Dataset.tile_mpp).where(Dataset.name == name)).first()
    if found is None:
        return
    same_mpp = (found.tile_mpp is None) == (tile_mpp is None) and (
        tile_mpp is None or math.isclose(found.tile_mpp, tile_mpp, rel_tol=1e-6)
    )
    if found.tile_px == tile_px and same_mpp:
        return
    raise UserError(
        f"Dataset '{name}' holds {_scale_words(found.tile_px, found.tile_mpp)}; these would be "
        f"{_scale_words(tile_px, tile_mpp)}. Ingest them into a new dataset name instead."
    )


def _scale_words(tile_px: int | None, mpp: float | None) -> str:
    if tile_px is not None:
        return f"tiles of {tile_px} px at {mpp:g} microns per pixel cut from slides"
    return "field images" + (f" at {mpp:g} microns per pixel" if mpp is not None else " without a microns per pixel")


def ingest_slides(
    session: Session,
    settings: Settings,
    source: Path,
    name: str,
    *,
    mpp: float | None = None,
    tile_px: int | None = None,
    tile_mpp: float | None = None,
    max_tiles: int | None = None,
    keep_paths: bool = True,
    progress: ProgressCallback | None = None,
    user: User,
) -> SlideIngestReport:
    """Tile every slide in the class folders of `source` and add the tiles to dataset `name`.

    `mpp` is the slides' microns per pixel for those whose file records none (or an implausible
    one); tile_px, tile_mpp and max_tiles default to the settings (`tile_scale`). `keep_paths`
    records where each slide lies, so `python -m core check` can tell when it changes; False for a
    copy that is removed afterwards (an upload). `progress(done, total)` counts slides tiled.
    UserError, with nothing stored, for a slide that cannot be used, a folder that is not one of
    slides, or anything ingest refuses. Rows are added and flushed; the caller commits.
    """
    require_editor(user, "add images")
    name = check_name_length(name.strip(), "Dataset name")
    if not name:
        raise UserError("Give the dataset a name.")
    scale = tile_scale(settings, tile_px, tile_mpp, max_tiles)
    given_mpp = None if mpp is None else check_mpp(mpp, "Slide microns per pixel (--mpp)")
    source = Path(source).expanduser()
    found = _slide_scan(source)
    if found is None:
        raise UserError(f"{source.name} is not a folder of class sub-folders of whole-slide images.")
    check_dataset_scale(session, name, scale.tile_px, scale.mpp)
    created = session.scalar(select(Dataset.id).where(Dataset.name == name)) is None
    labels = sorted({s.label for s in found.slides})
    if created and len(labels) < 2:
        raise UserError(
            f"Found slides in {len(labels)} class folder(s) of {source.name} ({', '.join(labels)}); "
            "need at least 2. Expected layout: CLASS/slide.svs, one folder per class."
        )
    new, present = _new_slides(session, name, found.slides)
    check_disk(settings)
    hold_ingest_lock(session, settings)  # the work folder is not a leftover while this runs
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slides-", dir=settings.tmp_dir))
    try:
        tiled = _tile_all(new, work, scale, given_mpp, progress)
        report = ingest(session, settings, work / "tiles", name, groups_csv=work / "groups.csv", user=user)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _record(session, report.dataset_id, source if created else None, tiled, found.skipped, scale, keep_paths)
    return SlideIngestReport(
        report,
        tuple((t.file.rel, t.file.label, len(t.tiling.tiles)) for t in tiled),
        tuple(s.rel for s in present),
        scale,
        found.skipped,
    )


def _new_slides(
    session: Session, name: str, slides: tuple[SourceFile, ...]
) -> tuple[list[SourceFile], list[SourceFile]]:
    """(slides to tile, slides the dataset already holds, identical). UserError for two slides of
    one name or stem (a slide's name is its tiles' group, its stem their file names), or a slide of
    the name of a different one already in the dataset."""
    by_stem: dict[str, SourceFile] = {}
    for s in slides:
        check_name_length(s.name, "Slide file name")
        other = by_stem.setdefault(s.name.rsplit(".", 1)[0].lower(), s)
        if other is not s:
            raise UserError(
                f"{other.rel} and {s.rel}: two slides of the same name. A slide's name tells its "
                "tiles apart from other slides' in the dataset; rename one."
            )
    recorded = {
        row.file_name: row
        for row in session.execute(
            select(SlideRow.file_name, SlideRow.sha256, SlideRow.label).join(Dataset).where(Dataset.name == name)
        )
    }
    new, present = [], []
    for s in slides:
        old = recorded.get(s.name)
        if old is None:
            new.append(s)
        elif _sha256(s.path) != old.sha256:
            raise UserError(
                f"Dataset '{name}' already holds another slide named {s.name}; rename this one "
                f"({s.rel}) or ingest into a new dataset name."
            )
        elif old.label != s.label:
            raise UserError(f"{s.rel} is already in dataset '{name}' as {old.label}: a slide has one class.")
        else:
            present.append(s)
    return new, present


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:  # in chunks: a slide can be gigabytes
        return hashlib.file_digest(f, "sha256").hexdigest()


def _open(file: SourceFile, mpp: float | None) -> Slide:
    """The slide at its own microns per pixel; `mpp` where the file records none or an implausible one."""
    if mpp is None:
        return open_slide(file.path)
    try:
        return open_slide(file.path)
    except UserError:
        return open_slide(file.path, mpp)  # a damaged file fails again, with its own message


def _tile_all(
    slides: list[SourceFile], work: Path, scale: TileScale, mpp: float | None, progress: ProgressCallback | None
) -> list[TiledSlide]:
    """Tile each slide into work/tiles/CLASS/STEM__X_Y.png; its tiles' groups into work/groups.csv."""
    tiled: list[TiledSlide] = []
    rows: list[tuple[str, str]] = []
    (work / "tiles").mkdir()
    for i, file in enumerate(slides, 1):
        folder = work / "tiles" / file.label
        folder.mkdir(exist_ok=True)
        done = _tile_one(file, folder, scale, mpp)
        stem = file.name.rsplit(".", 1)[0]
        rows += [(f"{file.label}/{stem}__{t.x}_{t.y}.png", file.name) for t in done.tiling.tiles]
        tiled.append(done)
        if progress is not None:
            progress(i, len(slides))
    write_manifest(rows, work / "groups.csv")
    return tiled


def _tile_one(file: SourceFile, folder: Path, scale: TileScale, mpp: float | None) -> TiledSlide:
    """Open, hash and tile one slide, writing its kept tiles into `folder`."""
    stat = file.path.stat()  # before hashing: a file changed meanwhile then differs from its record
    sha = _sha256(file.path)
    stem = file.name.rsplit(".", 1)[0]
    with _open(file, mpp) as slide:
        tiling = tile_slide(slide, tile_px=scale.tile_px, mpp=scale.mpp, max_tiles=scale.max_tiles, seed=SEED)
        if not tiling.tiles:
            raise UserError(
                f"{file.rel}: no tissue was found on this slide (no tile of it is mostly tissue), "
                "so it gives no tiles. Check that it is the right file, or leave it out. "
                "Nothing was ingested."
            )
        for batch in iter_tiles(slide, tiling, TILE_BATCH):
            for tile, pixels in zip(batch.tiles, batch.pixels):
                # Fast compression: the bytes are stored as they are and read once to be cached.
                PILImage.fromarray(pixels).save(folder / f"{stem}__{tile.x}_{tile.y}.png", compress_level=1)
        info = slide.info
    return TiledSlide(
        file=file,
        size_bytes=stat.st_size,
        mtime=stat.st_mtime,
        sha256=sha,
        mpp=info.mpp,
        vendor=info.vendor,
        width=info.width,
        height=info.height,
        tiling=tiling,
    )


def _record(
    session: Session,
    dataset_id: int,
    source: Path | None,
    tiled: list[TiledSlide],
    skipped: tuple[tuple[str, str], ...],
    scale: TileScale,
    keep_paths: bool,
) -> None:
    """The dataset's scale and given groups, each new slide's row, and what in the source was not read."""
    dataset = session.get(Dataset, dataset_id)
    assert dataset is not None
    dataset.tile_px, dataset.tile_mpp = scale.tile_px, scale.mpp
    dataset.groups_estimated = False  # each tile's slide is known, not estimated
    if source is not None:  # a new dataset: its source is the slides' folder, not the work folder
        dataset.source = str(source.resolve())
    for t in tiled:
        session.add(
            SlideRow(
                dataset_id=dataset.id,
                label=t.file.label,
                file_name=t.file.name,
                source_path=str(t.file.path) if keep_paths else None,
                size_bytes=t.size_bytes,
                mtime=t.mtime,
                sha256=t.sha256,
                mpp=t.mpp,
                vendor=t.vendor[:100],
                width=t.width,
                height=t.height,
                tiling=t.tiling.to_json(),
                tiles_kept=len(t.tiling.tiles),
            )
        )
    dataset.skipped += [SkippedFile(path=p, reason=r) for p, r in skipped]
    session.flush()


def ingest_fields(
    session: Session,
    settings: Settings,
    source: Path,
    name: str,
    *,
    user: User,
    mpp: float | None = None,
    **options: Any,
) -> IngestReport:
    """Ingest microscope field images (core.data.ingest.ingest, `options` passed on), recording `mpp`,
    their microns per pixel where known, as the dataset's tile_mpp (tile_px stays None) so a model
    trained on them records the scale it learned at. UserError, before anything is stored, for an
    implausible mpp or a dataset of another scale."""
    given = None if mpp is None else check_mpp(mpp, "Microns per pixel (--mpp)")
    check_dataset_scale(session, check_name_length(name.strip(), "Dataset name"), None, given)
    report = ingest(session, settings, source, name, user=user, **options)
    if given is not None:
        dataset = session.get(Dataset, report.dataset_id)
        assert dataset is not None
        dataset.tile_mpp = given
        session.flush()
    return report
