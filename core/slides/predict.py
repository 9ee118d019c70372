"""Predict a whole slide with a trained model: every tissue tile at the model's own scale, and the
slide's verdict from their mean.

A model learned tissue at one physical scale, and its model file records it (core/slides/scale.py:
tiles of `tile_px` pixels at `mpp` microns per pixel). The slide is tiled at that scale and no other:
`slide_scale` refuses a model that records none (one trained on microscope fields, whose pixels
have no known size), and `predict_slide` refuses a scale other than the model's own. Every tissue
tile is used (`tile_slide(..., max_tiles=0)`): a slide is predicted whole, not sampled.

Tiles are read in batches (`iter_tiles`), handed to the predictor as PIL images through its
`predict`, the same path from an image to the model's input as every other prediction (the run's
evaluation pipeline, stain normalisation included, its test-time augmentation and its calibration),
and dropped; so memory holds one batch of pixels and the (tiles x classes) probabilities, whatever
the slide's size. `progress(done, total)` is called once the tiles are counted and after each
batch, and `cancelled()` asked before each.

The slide's probabilities are the mean of its tiles' (Slideflow's default slide-level aggregation),
calibrated where the run has a temperature. Its "uncertain, refer" verdict applies the run's refer
band to that mean, as core/inference/service.py does for an image; the band was chosen on the run's
validation images (microscope fields or tiles), not on whole slides, so it speaks for slides only as
far as a slide's mean behaves like one such image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from core.config import Settings
from core.errors import UserError
from core.evaluation.calibration import ReferBand, refer_verdict
from core.inference.probabilities import CALIBRATED, RAW
from core.slides.reader import SlideInfo, is_slide_path, open_slide
from core.slides.scale import ModelScale, model_scale
from core.slides.tiling import Tile, Tiling, iter_tiles, tile_slide

if TYPE_CHECKING:  # annotations only: reading a slide's records needs neither the database nor accounts
    from sqlalchemy.orm import sessionmaker

    from core.access.accounts import User

# Tiles per call of the model: a progress step, and the pixels held at once (32 x 224 px: 4.8 MB). A GPU
# wants many at once; on the CPU DenseNet-201 is no faster per tile in a batch, and ONNX Runtime is
# slower at 32 than at 1 to 4 (bench/slide.py: 8 against 10-11 tiles/s at 224 px on two cores).
BATCH_CUDA, BATCH_CPU = 32, 4


def default_batch(predictor) -> int:
    """Tiles per call for the predictor's device."""
    device = getattr(predictor, "device", None)
    return BATCH_CUDA if getattr(device, "type", None) == "cuda" else BATCH_CPU


TOP_TILES = 8  # the most confident tiles kept per class, for a gallery


class SlideCancelled(Exception):
    """`cancelled()` said yes between two batches; nothing of the slide's prediction is kept."""


@dataclass(frozen=True)
class TopTile:
    """One of a class's most confident tiles: its index in the tiling, level-0 top-left, probability."""

    index: int
    x: int
    y: int
    probability: float


@dataclass(frozen=True, eq=False)
class SlidePrediction:
    """A slide classified tile by tile. Row i of `tile_probabilities` is tiling.tiles[i]."""

    info: SlideInfo
    tiling: Tiling  # at `scale`, every tissue tile (no cap)
    scale: ModelScale  # the model's own
    classes: tuple[str, ...]
    tile_probabilities: np.ndarray  # (n_tiles, n_classes) float32, of `kind`; read-only
    kind: str  # "calibrated" or "raw", as core/inference/service.py's Classified
    probabilities: dict[str, float]  # the slide's: the mean of its tiles', class -> probability
    predicted: str
    refer: bool | None  # "uncertain, refer" by the run's band; None: no calibration, so no band
    threshold: float | None  # the calibrated confidence below which the slide is referred
    refer_target: float | None  # the accuracy the threshold promises on validation images like the run's
    tissue_share: dict[str, float]  # class -> share of the tissue tiles predicted as it (argmax)
    top_tiles: dict[str, tuple[TopTile, ...]]  # class -> its most probable tiles, most probable first
    seconds: float  # the whole prediction: opening, tiling (which reads each candidate once) and the model
    tiling_seconds: float  # of which tiling
    run_id: int | None
    model_sha256: str | None = None  # the model file's, where the run's file was used (classify_slide)

    @property
    def n_tiles(self) -> int:
        return len(self.tiling.tiles)

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("inf")

    @property
    def confidence(self) -> float:
        return self.probabilities[self.predicted]

    @property
    def label(self) -> str:
        """What the probabilities are, in words (core/inference/probabilities.py)."""
        return CALIBRATED if self.kind == "calibrated" else RAW

    @property
    def tile_predicted(self) -> np.ndarray:
        """(n_tiles,) the index in `classes` of each tile's most probable class."""
        return self.tile_probabilities.argmax(1) if self.n_tiles else np.zeros(0, int)

    @property
    def positions(self) -> np.ndarray:
        """(n_tiles, 2) each tile's level-0 top-left (x, y)."""
        return np.array([(t.x, t.y) for t in self.tiling.tiles], dtype=np.int64).reshape(-1, 2)


def slide_scale(predictor) -> ModelScale:
    """The scale the predictor's model was trained at; UserError for a model that records none."""
    scale = model_scale(predictor.meta)
    if scale is None:
        run = "This model" if predictor.run_id is None else f"Run {predictor.run_id}"
        raise UserError(
            f"{run} was trained on field images of unknown scale: its model file records no tile size and microns "
            "per pixel, so a slide cannot be cut into tiles like those it learned from. To predict slides, train a "
            "run on a dataset ingested from whole-slide images; its model file records the scale of its tiles."
        )
    return scale


def predict_slide(
    predictor,
    slide_path: Path | str,
    *,
    scale: ModelScale,
    settings: Settings,
    mpp: float | None = None,
    batch: int | None = None,
    target: float | None = None,
    calibrated: bool = True,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SlidePrediction:
    """Classify every tissue tile of the slide at `slide_path` with `predictor`, at the model's `scale`.

    `scale` must be the model's own (`slide_scale(predictor)`; ValueError otherwise). `mpp`: the
    slide's microns per level-0 pixel, where its file records none or a wrong one. `target`: the
    accuracy the refer band aims at (None: the run's own); `calibrated=False` gives raw probabilities
    and no verdict. `progress(done, total)` once the tiles are counted and after each batch of `batch`
    tiles (None: `default_batch` for the predictor's device); `cancelled()` before each batch,
    SlideCancelled when it says yes. UserError for a file that is not a readable slide, a slide
    without a scale, or one without tissue.
    """
    own = slide_scale(predictor)
    if scale != own:
        raise ValueError(f"the model was trained at {own}, not {scale}")
    path = Path(slide_path)
    if path.is_file() and not is_slide_path(path):
        raise UserError(
            f"{path.name} is not a whole-slide image (SVS, NDPI, MRXS, SCN, VMS, BIF, CZI or pyramidal "
            "TIFF); classify an image of one field with `python -m core predict`.",
            page=f"{path.name} is not a whole-slide image (SVS, NDPI, MRXS, SCN, VMS, BIF, CZI or "
            "pyramidal TIFF); an image of one microscope field is classified as an image, not as a slide.",
        )
    # The band first: a run whose calibration cannot give one says so before the slide is read.
    band = predictor.refer_band(target) if calibrated and predictor.temperature is not None else None
    started = time.perf_counter()
    with open_slide(path, mpp) as slide:
        tiling = tile_slide(
            slide,
            scale.tile_px,
            scale.mpp,
            max_tiles=0,
            min_saturation=settings.tissue_min_saturation,
            max_pale_fraction=settings.tissue_max_pale_fraction,
        )
        if not tiling.tiles:
            raise UserError(
                f"{slide.info.name} shows no tissue to classify: no tile of it at {scale.mpp:g} microns "
                "per pixel is stained tissue rather than glass."
            )
        tiling_seconds = time.perf_counter() - started
        shown = _tile_probabilities(
            predictor, slide, tiling, batch or default_batch(predictor), band is not None, progress, cancelled
        )
        info = slide.info
    return _summarise(predictor, info, tiling, scale, shown, band, time.perf_counter() - started, tiling_seconds)


def _tile_probabilities(
    predictor,
    slide,
    tiling: Tiling,
    batch: int,
    calibrated: bool,
    progress: Callable[[int, int], None] | None,
    cancelled: Callable[[], bool] | None,
) -> np.ndarray:
    """(n_tiles, n_classes) float32 probabilities, calibrated or raw."""
    total, done = len(tiling.tiles), 0
    out = np.empty((total, len(predictor.classes)), np.float32)
    if progress is not None:
        progress(0, total)  # tiling is done: the count is known
    for tiles, pixels in iter_tiles(slide, tiling, batch):
        if cancelled is not None and cancelled():
            raise SlideCancelled(f"prediction of {slide.info.name} cancelled after {done} of {total} tiles")
        probs = predictor.predict([Image.fromarray(p, "RGB") for p in pixels], calibrated=calibrated)
        out[done : done + len(tiles)] = probs.shown
        done += len(tiles)
        if progress is not None:
            progress(done, total)
    out.flags.writeable = False
    return out


def _summarise(
    predictor,
    info: SlideInfo,
    tiling: Tiling,
    scale: ModelScale,
    shown: np.ndarray,
    band: ReferBand | None,
    seconds: float,
    tiling_seconds: float,
) -> SlidePrediction:
    classes = tuple(predictor.classes)
    mean = shown.astype(np.float64).mean(0)
    threshold = aimed = refer = None
    if band is not None:  # the band as core/inference/service.py applies it to one image
        threshold, aimed = band.threshold, band.target
        refer = bool(refer_verdict(mean[None], threshold)[0])
    winners = shown.argmax(1)
    share = np.bincount(winners, minlength=len(classes)) / len(winners)
    return SlidePrediction(
        info=info,
        tiling=tiling,
        scale=scale,
        classes=classes,
        tile_probabilities=shown,
        kind="raw" if band is None else "calibrated",
        probabilities={c: float(v) for c, v in zip(classes, mean)},
        predicted=classes[int(mean.argmax())],
        refer=refer,
        threshold=threshold,
        refer_target=aimed,
        tissue_share={c: float(v) for c, v in zip(classes, share)},
        top_tiles={c: _top(tiling.tiles, shown[:, k]) for k, c in enumerate(classes)},
        seconds=seconds,
        tiling_seconds=tiling_seconds,
        run_id=predictor.run_id,
    )


def _top(tiles: tuple[Tile, ...], column: np.ndarray, k: int = TOP_TILES) -> tuple[TopTile, ...]:
    order = np.argsort(-column, kind="stable")[:k]
    return tuple(TopTile(int(i), tiles[i].x, tiles[i].y, float(column[i])) for i in order)


def classify_slide(
    Session: sessionmaker,
    settings: Settings,
    user: User,
    slide_path: Path | str,
    *,
    run_id: int | None = None,
    source: str,
    log: bool = False,
    mpp: float | None = None,
    target: float | None = None,
    calibrated: bool = True,
    device: str = "auto",
    batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SlidePrediction:
    """Classify a slide with run `run_id` (None: the approved model, as core/inference/service.py's
    `classify` picks it) and, with `log`, log it as one row coming from `source` by `user`.

    The model is found and its scale checked before the slide is opened. The row is the slide's:
    its file's name, sha256 and size, its level-0 width and height, the mean probabilities and the
    verdict; the slide itself is never kept (PREDICTION_LOG_IMAGES keeps images only). The other
    arguments are predict_slide's.
    """
    from core.inference import engine, prediction_log
    from core.inference.predict import model_sha256
    from core.inference.service import resolve_run

    if source not in prediction_log.SOURCES:
        raise ValueError(f"source must be one of {prediction_log.SOURCES}, not {source!r}")
    with Session() as s:
        run_id = resolve_run(s, settings, run_id)
        predictor = engine.get_predictor(s, settings, run_id, device)
    scale = slide_scale(predictor)
    path = Path(slide_path)
    pred = predict_slide(
        predictor,
        path,
        scale=scale,
        settings=settings,
        mpp=mpp,
        batch=batch,
        target=target,
        calibrated=calibrated,
        progress=progress,
        cancelled=cancelled,
    )
    pred = dataclasses.replace(pred, model_sha256=model_sha256(settings, run_id))
    if log:
        entry = log_entry(pred, path, user.name, source)
        with Session.begin() as s:
            prediction_log.record(s, [entry])
            prediction_log.prune(s, settings)
    return pred


def log_entry(pred: SlidePrediction, path: Path, user: str, source: str):
    """The prediction log's row of a slide (core/inference/prediction_log.py LogEntry)."""
    from core.inference.prediction_log import LogEntry

    with open(path, "rb") as f:  # read in chunks: a slide's file may be gigabytes
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return LogEntry(
        user=user,
        source=source,
        run_id=pred.run_id,
        model_sha256=pred.model_sha256,
        image_sha256=sha,
        image_name=pred.info.name,
        width=pred.info.width,
        height=pred.info.height,
        size_bytes=path.stat().st_size,
        probabilities=dict(pred.probabilities),
        probability_kind=pred.kind,
        predicted=pred.predicted,
        refer=pred.refer,
        threshold=pred.threshold,
        refer_target=pred.refer_target,
    )
