"""Classifying images: the one path the Predict page, the HTTP API and `python -m core predict` share.

`classify` first finds the model (the run named, or the approved model when none is:
core/inference/approval.py; its predictor from core/inference/engine.py), so that a request for a
model that cannot classify is answered without decoding anything. It then reads each image's header
(not an image, more than MAX_IMAGE_PIXELS), takes its turn and pixel budget from
core/inference/admission.py, and decodes the images one at a time: each reduced toward the model's
input size as it is decoded (core/data/decoding.py: images past REDUCE_ABOVE_PIXELS only, so ordinary
ones get exactly the probabilities they always had), cut into the run's samples at once and dropped,
so that a batch holds samples, never a list of full-size images. Probabilities are turned into what
every display shows (calibrated where the run has a temperature, with the "uncertain, refer" verdict
for the accuracy `target`; raw otherwise, with no verdict) and one row per image is logged
(core/inference/prediction_log.py).

Sessions are short: one to find the run and its predictor, none while the model runs, one to log.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm import Session, sessionmaker

from core.access.accounts import User
from core.config import Settings
from core.data.decoding import image_size, load_rgb
from core.errors import UserError
from core.evaluation.calibration import refer_verdict
from core.inference import admission, prediction_log
from core.inference.approval import approved_run
from core.inference.probabilities import CALIBRATED, RAW, Probabilities

BATCH = 16  # images per call of the model, so that a progress bar moves and memory stays bounded
# A model that resizes whole images to S px gets images over REDUCE_ABOVE_PIXELS reduced to no less
# than this many times S on their shorter side: enough for its resize to average over, as it would
# over the full image, and for Grad-CAM's display of up to 640 px.
REDUCE_MARGIN = 8


@dataclass(frozen=True)
class ImageInput:
    name: str
    data: bytes


@dataclass(frozen=True)
class _Header:
    """An image whose header was read: what the log records of it, before any pixel is decoded."""

    index: int  # in the caller's images
    sha256: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class Classified:
    """One image's answer, as every front end shows it."""

    name: str
    image_sha256: str
    width: int
    height: int
    size_bytes: int
    predicted: str
    probabilities: dict[str, float]  # class -> probability of `kind`, in the model's class order
    kind: str  # "calibrated" or "raw"
    refer: bool | None  # "uncertain, refer"; None: the run has no calibration, so no refer band
    threshold: float | None  # the calibrated confidence below which a prediction is referred
    run_id: int
    model_sha256: str
    # The accuracy the threshold promises for what it lets through, at 95% confidence
    # (core/evaluation/calibration.py refer_band); None without a refer band.
    refer_target: float | None = None

    @property
    def confidence(self) -> float:
        return self.probabilities[self.predicted]

    @property
    def label(self) -> str:
        """What these probabilities are, in words (core/inference/probabilities.py)."""
        return CALIBRATED if self.kind == "calibrated" else RAW


# One vocabulary for a prediction, wherever it is read: the API's /predict and /predictions, the
# prediction log's CSV, `python -m core predict`'s CSV and the Predict page's download.
PREDICTION_FIELDS = (
    "image_name",
    "image_sha256",
    "width",
    "height",
    "size_bytes",
    "predicted",
    "probabilities",
    "probability_kind",
    "refer",
    "refer_threshold",
    "refer_target",
    "run_id",
    "model_sha256",
)


def prediction_record(c: Classified) -> dict:
    """`c` in the fields of PREDICTION_FIELDS (probabilities: class -> probability of probability_kind)."""
    return {
        "image_name": c.name,
        "image_sha256": c.image_sha256,
        "width": c.width,
        "height": c.height,
        "size_bytes": c.size_bytes,
        "predicted": c.predicted,
        "probabilities": dict(c.probabilities),
        "probability_kind": c.kind,
        "refer": c.refer,
        "refer_threshold": c.threshold,
        "refer_target": c.refer_target,
        "run_id": c.run_id,
        "model_sha256": c.model_sha256,
    }


def prediction_row(c: Classified) -> dict:
    """prediction_record flattened for a CSV: each class's probability in a column of its own, after
    the other fields (None for a field with no value, which a CSV leaves empty)."""
    record = prediction_record(c)
    return {**{k: v for k, v in record.items() if k != "probabilities"}, **record["probabilities"]}


Unreadable = Callable[[ImageInput, UserError], None]


def _stream(image: ImageInput) -> io.BytesIO:
    stream = io.BytesIO(image.data)
    stream.name = image.name  # the decoder names the file in its UserError
    return stream


def reduce_side(image_size: int, tiles: int = 0) -> int | None:
    """The shorter side a large image is decoded down to for a model at `image_size` px (None:
    whole, for a model that cuts tiles at native resolution)."""
    return None if tiles else REDUCE_MARGIN * image_size


def decode_one(settings: Settings, image: ImageInput, reduce_to: int | None = None) -> PILImage.Image:
    """The image decoded to 8-bit RGB, reduced toward `reduce_to` (see `reduce_side`) when it is
    large; UserError naming it when it is not an image or has too many pixels."""
    return load_rgb(_stream(image), max_pixels=settings.max_image_pixels, reduce_to=reduce_to)


def resolve_run(session: Session, settings: Settings, run_id: int | None) -> int:
    """`run_id`, or when None the approved model's run (the most recently approved of any class
    set); UserError when no model is approved, or the approved one's run has been deleted."""
    if run_id is not None:
        return run_id
    approval = approved_run(session)
    if approval is None:
        raise UserError(
            "No model is approved yet, so there is no default model to classify with. An editor "
            "approves a run that succeeded on the Runs page or with `python -m core approve RUN "
            "--note TEXT`; or name the run to use."
        )
    if approval.run_id is None:
        raise UserError(
            f"The approved model for {', '.join(approval.classes)} ({approval.run_label}) was deleted "
            "with its run. An editor approves another run, or name the run to use."
        )
    return approval.run_id


def classify(
    Session: sessionmaker,
    settings: Settings,
    user: User,
    images: Sequence[ImageInput],
    *,
    run_id: int | None = None,
    source: str,
    target: float | None = None,
    log: bool = True,
    calibrated: bool = True,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    unreadable: Unreadable | None = None,
    seen: Callable[[int, PILImage.Image], None] | None = None,
) -> list[Classified]:
    """Classify `images` with run `run_id` (None: the approved model) and, with `log`, log each as
    coming from `source` ("page", "api" or "cli") by `user`.

    `target`: the accuracy a prediction shown as a diagnosis must reach (None: the run's own,
    chosen at training); `calibrated=False` gives the raw probabilities and no verdict.
    `progress(done, total)` is called after each batch. A file that is not a usable image ends the
    call with its UserError, nothing logged; with `unreadable`, it is handed to it and left out.
    `seen(index, rgb)` is called with each classified image (its index in `images`, decoded and
    reduced as the model gets it) before it is dropped, in the order of the results.
    Past the limits of core/inference/admission.py: its UserErrors, before anything is decoded."""
    if source not in prediction_log.SOURCES:
        raise ValueError(f"source must be one of {prediction_log.SOURCES}, not {source!r}")
    if not images:
        return []
    from core.inference import engine
    from core.inference.predict import model_sha256

    with Session() as s:
        run_id = resolve_run(s, settings, run_id)
        predictor = engine.get_predictor(s, settings, run_id, device)
    sha = model_sha256(settings, run_id)
    headers = _headers(settings, images, unreadable)
    if log:
        prediction_log.check_room(settings, [(h.sha256, len(images[h.index].data)) for h in headers])
    if not headers:
        return []
    with admission.admitted(settings, user.name, sum(h.pixels for h in headers), len(headers)):
        done, raw = _run_model(settings, predictor, images, headers, progress, unreadable, seen)
    results = _answers(
        predictor, images, done, Probabilities(raw, predictor.temperature if calibrated else None), target, run_id, sha
    )
    if log:
        _log(Session, settings, user, source, results, [images[h.index].data for h in done])
    return results


def _headers(settings: Settings, images: Sequence[ImageInput], unreadable: Unreadable | None) -> list[_Header]:
    """Each image's size from its header (MAX_IMAGE_PIXELS checked) and its sha256."""
    headers = []
    for i, image in enumerate(images):
        try:
            width, height = image_size(_stream(image), settings.max_image_pixels)
        except UserError as e:
            if unreadable is None:
                raise
            unreadable(image, e)
            continue
        headers.append(_Header(i, hashlib.sha256(image.data).hexdigest(), width, height))
    return headers


def _run_model(
    settings: Settings,
    predictor,
    images: Sequence[ImageInput],
    headers: list[_Header],
    progress: Callable[[int, int], None] | None,
    unreadable: Unreadable | None,
    seen: Callable[[int, PILImage.Image], None] | None,
) -> tuple[list[_Header], np.ndarray]:
    """(the images classified, their raw probabilities): decoded one at a time, each cut into the
    pipeline's samples and dropped; BATCH images' samples go through the model at once."""
    reduce_to = reduce_side(predictor.image_size, predictor.tiles)
    done: list[_Header] = []
    parts: list[np.ndarray] = [np.empty((0, len(predictor.classes)))]
    cuts: list[np.ndarray] = []
    for n, header in enumerate(headers, 1):
        try:
            rgb = decode_one(settings, images[header.index], reduce_to)
        except UserError as e:
            if unreadable is None:
                raise
            unreadable(images[header.index], e)
        else:
            cuts.append(predictor.pipeline.samples(rgb))
            done.append(header)
            if seen is not None:
                seen(header.index, rgb)
            del rgb
        if cuts and (len(cuts) == BATCH or n == len(headers)):
            parts.append(_score(predictor, cuts))
            cuts = []
            if progress is not None:
                progress(len(done), len(done) + len(headers) - n)
    return done, np.concatenate(parts)


def _score(predictor, cuts: list[np.ndarray]) -> np.ndarray:
    """Raw probabilities of the images whose samples (the pipeline's geometric step) are `cuts`: the
    rest of what predictor.probabilities does with the images themselves, stain normalisation, the
    model and, for tiles, the vote."""
    from core.data.cache import to_tensor

    owners = np.repeat(np.arange(len(cuts)), [len(c) for c in cuts])
    samples = np.stack(predictor.pipeline.prepare([a for cut in cuts for a in cut]))
    raw = predictor.score(to_tensor(list(samples)), owners if predictor.tiles else None)
    return np.asarray(raw, dtype=np.float64)


def _answers(
    predictor,
    images: Sequence[ImageInput],
    headers: list[_Header],
    probs: Probabilities,
    target: float | None,
    run_id: int,
    sha: str,
) -> list[Classified]:
    """Each image's answer, with the refer verdict computed as the Predict page always has."""
    shown, classes = probs.shown, list(predictor.classes)
    if probs.is_calibrated:
        band = predictor.refer_band(target)
        threshold, aimed = band.threshold, band.target
        refer: list[bool | None] = [bool(r) for r in refer_verdict(shown, threshold)]
    else:
        threshold, aimed, refer = None, None, [None] * len(headers)
    kind = "calibrated" if probs.is_calibrated else "raw"
    return [
        Classified(
            name=images[h.index].name,
            image_sha256=h.sha256,
            width=h.width,
            height=h.height,
            size_bytes=len(images[h.index].data),
            predicted=classes[int(p.argmax())],
            probabilities={c: float(v) for c, v in zip(classes, p)},
            kind=kind,
            refer=r,
            threshold=threshold,
            run_id=run_id,
            model_sha256=sha,
            refer_target=aimed,
        )
        for h, p, r in zip(headers, shown, refer)
    ]


def _log(
    Session: sessionmaker, settings: Settings, user: User, source: str, results: list[Classified], data: list[bytes]
) -> None:
    """One log row per image (`data`: each one's bytes), in one short transaction (which also prunes
    rows past PREDICTION_LOG_DAYS). Kept images are written first: a file whose row failed to commit
    is harmless, a row without its file is not. Every image is kept with PREDICTION_LOG_IMAGES=1;
    otherwise, with REVIEWS=1, those the model referred, for review (where MAX_DISK_GB leaves room)."""
    kept: dict[str, str] = {}
    if settings.prediction_log_images:
        kept = prediction_log.keep_images(settings, [(r.image_sha256, d) for r, d in zip(results, data)])
    else:
        kept = prediction_log.keep_for_review(settings, [(r.image_sha256, d) for r, d in zip(results, data) if r.refer])
    entries = [
        prediction_log.LogEntry(
            user=user.name,
            source=source,
            run_id=r.run_id,
            model_sha256=r.model_sha256,
            image_sha256=r.image_sha256,
            image_name=r.name,
            width=r.width,
            height=r.height,
            size_bytes=r.size_bytes,
            probabilities=r.probabilities,
            probability_kind=r.kind,
            predicted=r.predicted,
            refer=r.refer,
            threshold=r.threshold,
            refer_target=r.refer_target,
            stored_path=kept.get(r.image_sha256),
        )
        for r in results
    ]
    with Session.begin() as s:
        prediction_log.record(s, entries)
        prediction_log.prune(s, settings)
