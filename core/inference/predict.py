"""Classify new images with a trained run's model file (core/inference/model_file.py).

A Predictor is built from the model file alone (`Predictor.from_file`): the weights, the classes,
the evaluation pipeline with the run's fitted stain normalisation (core/transforms/pipelines.py) and
the calibration are all in it. The run's own test evaluation uses the same Predictor class on the
same pipeline, so a prediction of a test image gives back the probabilities stored for it.

The Predict page and the command line get their predictor through core/inference/engine.py, which
keeps one per model file (keyed by `model_sha256`), so the file is read and the model prepared once,
not per request, and which runs it on the CPU through ONNX Runtime instead. On CUDA the model runs in
bf16, channels_last, through torch.compile with CUDA graphs ("reduce-overhead"), which removes the
launch overhead of DenseNet-201's ~200 small layers at batch 1; where compilation fails it says so
in the log and runs eagerly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from core.config import Settings
from core.data.cache import to_tensor
from core.data.decoding import load_rgb
from core.errors import UserError
from core.evaluation import calibration
from core.inference.model_file import read_model
from core.inference.probabilities import Probabilities
from core.store.db import Run, RunStatus
from core.store.records import CalibrationRecord
from core.store.runs import get_run, model_path, run_dir
from core.training.loop import pick_device, predict_logits, predict_proba
from core.training.model import PaperDenseNet
from core.transforms import tiles
from core.transforms.pipelines import EvalPipeline

log = logging.getLogger(__name__)


class PredictorBase:
    """What the predictors of both engines share (core/inference/engine.py: this module's torch
    Predictor and core/inference/onnx_predict.py's OnnxPredictor): the run's classes, evaluation
    pipeline and calibration, and the way from images to probabilities. A subclass says how
    prepared samples become class probabilities (`sample_probabilities`)."""

    classes: list[str]
    pipeline: EvalPipeline
    calibration: CalibrationRecord  # the run's, fitted on its validation part
    run_id: int | None
    meta: dict[str, Any]  # the model file's description

    def sample_probabilities(self, samples: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, C) float64 probabilities of (N, 3, S, S) uint8 samples, with the run's test-time augmentation."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return self.pipeline.image_size

    @property
    def tiles(self) -> int:
        return self.pipeline.tiles

    @property
    def tta(self) -> bool:
        return self.pipeline.tta

    @property
    def normaliser(self):
        return self.pipeline.normaliser

    @property
    def temperature(self) -> float | None:
        return self.calibration.temperature

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities after the run's temperature scaling (unchanged when it has none)."""
        return probs if self.temperature is None else calibration.calibrate(probs, self.temperature)

    def refer_threshold(self, target_accuracy: float | None = None) -> float | None:
        """The calibrated top probability below which a prediction is "uncertain, refer": the run's
        own (chosen on validation for its recorded target), or one chosen on the same validation
        probabilities for `target_accuracy`. None: no threshold reaches the target, refer all."""
        return self.refer_band(target_accuracy).threshold

    def refer_band(self, target_accuracy: float | None = None) -> calibration.ReferBand:
        """The band for `target_accuracy` (None: the run's own target) with what it rests on, chosen
        on the stored validation probabilities (core/evaluation/calibration.py recorded_band)."""
        band = calibration.recorded_band(self.calibration, target_accuracy)
        if band is None:
            raise UserError(f"Run {self.run_id} has no validation part, so it has no calibrated refer threshold.")
        return band

    def probabilities(self, images: Sequence[PILImage.Image | np.ndarray]) -> np.ndarray:
        """(N, C) raw class probabilities of RGB images of any size, through the run's pipeline."""
        samples, owners = self.pipeline(images)
        return self.score(to_tensor(list(samples)) if len(samples) else samples, owners if self.tiles else None)

    def predict(self, images: Sequence[PILImage.Image | np.ndarray], *, calibrated: bool = True) -> Probabilities:
        """Raw and (where the run has a temperature, unless `calibrated` is False) calibrated probabilities."""
        return Probabilities(self.probabilities(images), self.temperature if calibrated else None)

    def score(self, samples: torch.Tensor | np.ndarray, owners: Sequence[int] | None = None) -> np.ndarray:
        """Raw probabilities of prepared samples ((N, 3, S, S) uint8, as the pipeline makes them), with
        the run's test-time augmentation; with `owners` (tiles), one row per image: its tiles' mean."""
        if len(samples) == 0:
            return np.empty((0, len(self.classes)))
        probs = self.sample_probabilities(samples)
        if owners is None:
            return probs
        owners = np.asarray(owners)
        return tiles.vote(probs, owners, int(owners.max()) + 1)


@dataclass
class Predictor(PredictorBase):
    """A trained model with the run's evaluation pipeline and calibration, run by torch."""

    model: torch.nn.Module
    classes: list[str]
    pipeline: EvalPipeline
    device: torch.device
    calibration: CalibrationRecord = field(
        default_factory=CalibrationRecord
    )  # the run's, fitted on its validation part
    run_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the model file's description

    @classmethod
    def from_file(cls, path: Path | str, device: str = "auto") -> Predictor:
        """The predictor of a model file, and nothing else: no database, no settings."""
        state, meta = read_model(Path(path))
        classes = list(meta["classes"])
        model = PaperDenseNet(len(classes))
        model.load_state_dict(state)
        pipeline = EvalPipeline(**meta["preparation"])
        dev = pick_device(device)
        model = prepare_for_inference(model, dev, pipeline.image_size)
        return cls(
            model,
            classes,
            pipeline,
            dev,
            CalibrationRecord.from_dict(meta.get("calibration")),
            meta.get("run_id"),
            meta,
        )

    def sample_probabilities(self, samples: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.from_numpy(samples) if isinstance(samples, np.ndarray) else samples
        return predict_proba(self.model, x, self.device, tta=self.tta).numpy().astype(np.float64)


def model_file(settings: Settings, run_id: int) -> Path:
    """The run's model file (core/inference/model_file.py)."""
    return model_path(settings, run_id)


def model_sha256(settings: Settings, run_id: int) -> str | None:
    """The sha256 of the run's model file (None when it has none): the key of a cache of loaded
    models. Not the run id: in a database made before ids were AUTOINCREMENT, a deleted run's id is
    given to the next run, whose model then lies at the same path."""
    path = model_file(settings, run_id)
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    # A model file is replaced by renaming a new file over it, which gives it a new inode.
    return file_sha256(str(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def file_sha256(path: str, *version: int) -> str:
    """The sha256 of a file's bytes, read once per `version` (its inode, size and times)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def usable_model_file(session, settings: Settings, run_id: int) -> tuple[Run, Path]:
    """(the run, its model file) for a succeeded run that has one; UserError otherwise."""
    run = get_run(session, run_id)
    path = model_file(settings, run_id)
    if run.status != RunStatus.succeeded:
        raise UserError(f"Run {run_id} has no trained model (status: {run.status.value}); pick a run that succeeded.")
    if not path.exists():
        if (run_dir(settings, run_id) / "best.pt").exists():
            raise UserError(
                f"Run {run_id} predates model files: it kept only a training checkpoint (best.pt), "
                "which prediction no longer reads. Train the run again to use it."
            )
        raise UserError(f"Run {run_id} has no model file ({path.name} is missing); train it again to use it.")
    return run, path


def check_model_owner(meta: dict[str, Any], run: Run) -> None:
    """UserError when a model file's description names another run than `run` (another database's)."""
    if meta.get("run_created") != run.created_at.isoformat():
        raise UserError(
            f"The model file under run {run.id}'s folder belongs to another run (another database's); "
            "train this run again to use it."
        )


def load_predictor(session, settings: Settings, run_id: int, device: str = "auto") -> Predictor:
    """The torch predictor of a succeeded run, from its model file (uncached; the engine's
    `get_predictor` is the cached one, with the configured engine)."""
    run, path = usable_model_file(session, settings, run_id)
    predictor = Predictor.from_file(path, device)
    check_model_owner(predictor.meta, run)
    return predictor


def prepare_for_inference(
    model: torch.nn.Module, device: torch.device, image_size: int, compile: bool = True
) -> torch.nn.Module:
    """Eval mode; on CUDA also channels_last and a compiled, CUDA-graphed model (checked by one
    warm-up call). On the CPU the model stays NCHW and eager: DenseNet's many concatenations made
    channels_last slower there at batch 1 (bench/predict.py), and the CPU's fast engine is ONNX
    Runtime (core/inference/engine.py), not a compiled torch model."""
    model = model.to(device).eval()
    if device.type != "cuda":
        return model
    model = model.to(memory_format=torch.channels_last)
    return compiled_or_eager(model, device, image_size) if compile else model


def compiled_or_eager(model: torch.nn.Module, device: torch.device, image_size: int) -> torch.nn.Module:
    """The model compiled through torch.compile with CUDA graphs, compiled now by one warm-up call
    rather than in a user's first request; the eager model, with a warning in the log, where
    compilation fails."""
    try:
        compiled = torch.compile(model, mode="reduce-overhead")
        predict_logits(compiled, torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), device)
        return compiled
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager model usable
        log.warning("torch.compile failed (%s: %s); predicting with the eager model.", type(exc).__name__, exc)
        return getattr(model, "_orig_mod", model)


def predict_files(
    predictor: Predictor, paths: Sequence[Path], max_pixels: int | None = None, *, calibrated: bool = True
) -> list[dict]:
    """One row per file: path, predicted class, which probabilities these are (calibrated where the
    run has a temperature, unless `calibrated` is False; raw otherwise), each class's probability,
    and with calibrated probabilities the "uncertain, refer" verdict."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file.")
        images.append(load_rgb(Path(path), max_pixels))
    probs = predictor.predict(images, calibrated=calibrated)
    shown = probs.shown
    rows = [
        {
            "path": str(path),
            "predicted": predictor.classes[int(p.argmax())],
            "probabilities": probs.label,
            **{c: float(v) for c, v in zip(predictor.classes, p)},
        }
        for path, p in zip(paths, shown)
    ]
    if probs.is_calibrated:
        for row, refer in zip(rows, calibration.refer_verdict(shown, predictor.refer_threshold())):
            row["uncertain_refer"] = bool(refer)
    return rows
