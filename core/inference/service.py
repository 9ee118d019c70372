"""Classifying images: the one path the Predict page, the HTTP API and `python -m core predict` share.

`classify` decodes each image (with the MAX_IMAGE_PIXELS limit), runs the run's predictor from
core/inference/engine.py (the approved model when no run is named, core/inference/approval.py),
turns its probabilities into what every display shows (calibrated where the run has a temperature,
with the "uncertain, refer" verdict for the accuracy `target`; raw otherwise, with no verdict) and
logs one row per image (core/inference/prediction_log.py). A front end that already holds the
decoded images (the Predict page shows them) calls `decode` itself and then `classify_decoded`.

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
from core.data.datasets import load_rgb
from core.errors import UserError
from core.evaluation.calibration import refer_verdict
from core.inference import prediction_log
from core.inference.approval import approved_run
from core.inference.probabilities import CALIBRATED, RAW, Probabilities

BATCH = 16  # images per call of the model, so that a progress bar moves and memory stays bounded


@dataclass(frozen=True)
class ImageInput:
    name: str
    data: bytes


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for the model, with what the log records of it."""

    name: str
    sha256: str
    size_bytes: int
    image: PILImage.Image  # 8-bit RGB
    data: bytes  # the bytes as given (kept with PREDICTION_LOG_IMAGES=1)


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

    @property
    def confidence(self) -> float:
        return self.probabilities[self.predicted]

    @property
    def label(self) -> str:
        """What these probabilities are, in words (core/inference/probabilities.py)."""
        return CALIBRATED if self.kind == "calibrated" else RAW


def decode_one(settings: Settings, image: ImageInput) -> DecodedImage:
    """The image decoded to RGB; UserError naming it when it is not an image or has too many pixels."""
    stream = io.BytesIO(image.data)
    stream.name = image.name  # load_rgb names the file in its UserError
    rgb = load_rgb(stream, max_pixels=settings.max_image_pixels)
    return DecodedImage(image.name, hashlib.sha256(image.data).hexdigest(), len(image.data), rgb, image.data)


def decode(settings: Settings, images: Sequence[ImageInput]) -> list[DecodedImage]:
    return [decode_one(settings, image) for image in images]


def resolve_run(session: Session, settings: Settings, run_id: int | None) -> int:
    """`run_id`, or when None the approved model's run (the most recently approved of any class
    set); UserError when no model is approved, or the approved one's run has been deleted."""
    if run_id is not None:
        return run_id
    approval = approved_run(session)
    if approval is None:
        raise UserError("No model is approved yet, so there is no default model to classify with. An editor "
                        "approves a run that succeeded on the Runs page or with `python -m core approve RUN "
                        "--note TEXT`; or name the run to use.")
    if approval.run_id is None:
        raise UserError(f"The approved model for {', '.join(approval.classes)} ({approval.run_label}) was deleted "
                        "with its run. An editor approves another run, or name the run to use.")
    return approval.run_id


def classify(Session: sessionmaker, settings: Settings, user: User, images: Sequence[ImageInput], *,
             run_id: int | None = None, source: str, target: float | None = None, log: bool = True,
             calibrated: bool = True, device: str = "auto",
             progress: Callable[[int, int], None] | None = None) -> list[Classified]:
    """Decode and classify `images` (see `classify_decoded`)."""
    return classify_decoded(Session, settings, user, decode(settings, images), run_id=run_id, source=source,
                            target=target, log=log, calibrated=calibrated, device=device, progress=progress)


def classify_decoded(Session: sessionmaker, settings: Settings, user: User, images: Sequence[DecodedImage], *,
                     run_id: int | None = None, source: str, target: float | None = None, log: bool = True,
                     calibrated: bool = True, device: str = "auto",
                     progress: Callable[[int, int], None] | None = None) -> list[Classified]:
    """Classify decoded images with run `run_id` (None: the approved model) and, with `log`, log
    each as coming from `source` ("page", "api" or "cli") by `user`.

    `target`: the accuracy a prediction shown as a diagnosis must reach (None: the run's own,
    chosen at training); `calibrated=False` gives the raw probabilities and no verdict.
    `progress(done, total)` is called after each batch."""
    if source not in prediction_log.SOURCES:
        raise ValueError(f"source must be one of {prediction_log.SOURCES}, not {source!r}")
    if not images:
        return []
    if log:
        prediction_log.check_room(settings, [(im.sha256, im.size_bytes) for im in images])
    from core.inference import engine
    from core.inference.predict import model_sha256

    with Session() as s:
        run_id = resolve_run(s, settings, run_id)
        predictor = engine.get_predictor(s, settings, run_id, device)
    sha = model_sha256(settings, run_id)
    raw = _raw_probabilities(predictor, [im.image for im in images], progress)
    results = _answers(predictor, images, Probabilities(raw, predictor.temperature if calibrated else None),
                       target, run_id, sha)
    if log:
        _log(Session, settings, user, source, images, results)
    return results


def _raw_probabilities(predictor, images: list[PILImage.Image],
                       progress: Callable[[int, int], None] | None) -> np.ndarray:
    parts = []
    for start in range(0, len(images), BATCH):
        parts.append(np.asarray(predictor.predict(images[start:start + BATCH]).raw, dtype=np.float64))
        if progress is not None:
            progress(min(start + BATCH, len(images)), len(images))
    return np.concatenate(parts)


def _answers(predictor, images: Sequence[DecodedImage], probs: Probabilities, target: float | None,
             run_id: int, sha: str) -> list[Classified]:
    """Each image's answer, with the refer verdict computed as the Predict page always has."""
    shown, classes = probs.shown, list(predictor.classes)
    if probs.is_calibrated:
        threshold = predictor.refer_threshold(target)
        refer: list[bool | None] = [bool(r) for r in refer_verdict(shown, threshold)]
    else:
        threshold, refer = None, [None] * len(images)
    kind = "calibrated" if probs.is_calibrated else "raw"
    return [Classified(name=im.name, image_sha256=im.sha256, width=im.image.width, height=im.image.height,
                       size_bytes=im.size_bytes, predicted=classes[int(p.argmax())],
                       probabilities={c: float(v) for c, v in zip(classes, p)}, kind=kind, refer=r,
                       threshold=threshold, run_id=run_id, model_sha256=sha)
            for im, p, r in zip(images, shown, refer)]


def _log(Session: sessionmaker, settings: Settings, user: User, source: str, images: Sequence[DecodedImage],
         results: list[Classified]) -> None:
    """One log row per image, in one short transaction (which also prunes rows past PREDICTION_LOG_DAYS).
    Kept images are written first: a file whose row failed to commit is harmless, a row without its
    file is not."""
    kept: dict[str, str] = {}
    if settings.prediction_log_images:
        kept = prediction_log.keep_images(settings, [(im.sha256, im.data) for im in images])
    entries = [prediction_log.LogEntry(
        user=user.name, source=source, run_id=r.run_id, model_sha256=r.model_sha256, image_sha256=r.image_sha256,
        image_name=r.name, width=r.width, height=r.height, size_bytes=r.size_bytes, probabilities=r.probabilities,
        probability_kind=r.kind, predicted=r.predicted, refer=r.refer, threshold=r.threshold,
        stored_path=kept.get(r.image_sha256)) for r in results]
    with Session.begin() as s:
        prediction_log.record(s, entries)
        prediction_log.prune(s, settings)
