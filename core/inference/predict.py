"""Classify new images with a trained run's best checkpoint.

The Predict page keeps one Predictor per model file (st.cache_resource, keyed by `model_sha256`),
so the checkpoint is read and the model prepared once, not per request. On CUDA the model runs in
bf16, channels_last, through torch.compile with CUDA graphs ("reduce-overhead"), which removes the
launch overhead of DenseNet-201's ~200 small layers at batch 1; where compilation fails it says so
in the log and runs eagerly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage

from core.evaluation import calibration
from core.transforms import tiles
from core.config import Settings
from core.data.cache import resize, resized_array, to_tensor
from core.data.datasets import load_rgb
from core.store.db import Image, RunStatus
from core.errors import UserError
from core.training.model import PaperDenseNet
from core.jobs.runs import get_run, run_dir
from core.transforms.stain import make_normaliser
from core.training.loop import pick_device, predict_logits, predict_proba

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    model: PaperDenseNet
    classes: list[str]
    image_size: int
    device: torch.device
    run_id: int
    normaliser: Callable[[np.ndarray], np.ndarray] | None = None  # the run's stain normalisation
    tta: bool = False  # the run's test-time augmentation
    calibration: dict = field(default_factory=dict)  # the run's, fitted on its validation part
    tiles: int = 0  # the run's tiles per image (0: whole images)

    @property
    def temperature(self) -> float | None:
        return self.calibration.get("temperature")

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities after the run's temperature scaling (unchanged when it has none)."""
        return probs if self.temperature is None else calibration.calibrate(probs, self.temperature)

    def refer_threshold(self, target_accuracy: float | None = None) -> float | None:
        """The calibrated top probability below which a prediction is "uncertain, refer": the run's
        own (chosen on validation for its recorded target), or one chosen on the same validation
        probabilities for `target_accuracy`. None: no threshold reaches the target, refer all."""
        if self.temperature is None:
            raise UserError(f"Run {self.run_id} has no validation part, so it has no calibrated refer threshold.")
        if target_accuracy is None:
            return self.calibration.get("refer_threshold")
        return calibration.refer_threshold(np.asarray(self.calibration["val_probs"]),
                                           self.calibration["val_labels"], target_accuracy)

    def probabilities(self, images: Sequence[PILImage.Image]) -> np.ndarray:
        """(N, C) class probabilities for RGB images of any size, prepared as the run's test images
        were: resized whole, or cut into tiles at native resolution whose probabilities are averaged."""
        if self.tiles:
            cuts = [tiles.cut_tiles(im, self.image_size, self.tiles) for im in images]
            arrays = [a for cut in cuts for a in cut]
            owners = np.repeat(np.arange(len(cuts)), [len(cut) for cut in cuts])
        else:
            arrays = [np.asarray(resize(im.convert("RGB"), self.image_size), dtype=np.uint8) for im in images]
        if self.normaliser is not None:
            arrays = [self.normaliser(a) for a in arrays]
        if not arrays:
            return np.empty((0, len(self.classes)))
        probs = predict_proba(self.model, to_tensor(arrays), self.device, tta=self.tta).numpy()
        return tiles.vote(probs, owners, len(images)) if self.tiles else probs


def model_file(settings: Settings, run_id: int) -> Path:
    """The run's model: its best checkpoint."""
    return run_dir(settings, run_id) / "best.pt"


def model_sha256(settings: Settings, run_id: int) -> str | None:
    """The sha256 of the run's model file (None when it has none): the key of a cache of loaded
    models. Not the run id: in a database made before ids were AUTOINCREMENT, a deleted run's id is
    given to the next run, whose model then lies at the same path."""
    path = model_file(settings, run_id)
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    # A checkpoint is replaced by renaming a new file over it, which gives it a new inode.
    return file_sha256(str(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def file_sha256(path: str, *version: int) -> str:
    """The sha256 of a file's bytes, read once per `version` (its inode, size and times)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_predictor(session, settings: Settings, run_id: int, device: str = "auto") -> Predictor:
    run = get_run(session, run_id)
    path = model_file(settings, run_id)
    if run.status != RunStatus.succeeded or not path.exists():
        raise UserError(f"Run {run_id} has no trained model (status: {run.status.value}); pick a run that succeeded.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    classes = list(checkpoint["classes"])
    model = PaperDenseNet(len(classes))
    model.load_state_dict(checkpoint["model"])
    dev = pick_device(device)
    size = int(checkpoint["image_size"])
    config = checkpoint["config"]
    normaliser = None
    if config.get("stain_normalisation", "none") != "none":
        # Refit on the run's own reference image, so new images look like its training images.
        reference = session.get(Image, checkpoint["stain_reference_image_id"])
        if reference is None:
            raise UserError(f"Run {run_id} normalised stains to image {checkpoint['stain_reference_image_id']}, "
                            "which is no longer stored; its model cannot be used for prediction.")
        normaliser = make_normaliser(config["stain_normalisation"], resized_array(settings, reference, size))
    model = prepare_for_inference(model, dev, size, cpu_compile=settings.cpu_compile)
    return Predictor(model, classes, size, dev, run_id,
                     normaliser=normaliser, tta=bool(config.get("tta", False)),
                     calibration=dict((run.summary or {}).get("calibration") or {}),
                     tiles=int(config.get("tiles", 0)))


def prepare_for_inference(model: torch.nn.Module, device: torch.device, image_size: int, compile: bool = True,
                          cpu_compile: bool = False) -> torch.nn.Module:
    """Eval mode; on CUDA also channels_last and a compiled, CUDA-graphed model (checked by one
    warm-up call). On the CPU the model stays NCHW: DenseNet's many concatenations made
    channels_last slower there at batch 1 (bench/predict.py); with `cpu_compile`, single images go
    through a compiled copy (SingleImageCompiled)."""
    model = model.to(device).eval()
    if device.type != "cuda":
        return compiled_or_eager(SingleImageCompiled(model), device, image_size) if cpu_compile else model
    model = model.to(memory_format=torch.channels_last)
    return compiled_or_eager(model, device, image_size) if compile else model


class SingleImageCompiled(torch.nn.Module):
    """CPU inference: a batch of one through torch.compile (inductor), any other batch eagerly, as a
    compiled graph per batch size would cost a compilation each. The eager model is `_orig_mod`, the
    name torch.compile's own wrapper gives it, so that code unwrapping a compiled model (Grad-CAM)
    finds it here too. The weights are shared, not frozen into the graph: inductor's on-disk cache
    then serves every run's model after the first compilation on a machine."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compiled(x) if x.shape[0] == 1 else self._orig_mod(x)


def compiled_or_eager(model: torch.nn.Module, device: torch.device, image_size: int) -> torch.nn.Module:
    """The model compiled (on CUDA through torch.compile with CUDA graphs; a SingleImageCompiled
    compiles itself), compiled now by one warm-up call rather than in a user's first request; the
    eager model, with a warning in the log, where compilation fails."""
    try:
        compiled = model if isinstance(model, SingleImageCompiled) else torch.compile(model, mode="reduce-overhead")
        predict_logits(compiled, torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), device)
        return compiled
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager model usable
        log.warning("torch.compile failed (%s: %s); predicting with the eager model.", type(exc).__name__, exc)
        return getattr(model, "_orig_mod", model)


def predict_files(predictor: Predictor, paths: Sequence[Path], max_pixels: int | None = None) -> list[dict]:
    """One row per file: path, predicted class and each class's probability."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file.")
        images.append(load_rgb(Path(path), max_pixels))
    probs = predictor.probabilities(images)
    rows = [
        {"path": str(path), "predicted": predictor.classes[int(p.argmax())],
         **{c: float(v) for c, v in zip(predictor.classes, p)}}
        for path, p in zip(paths, probs)
    ]
    if predictor.temperature is not None and len(probs):
        calibrated = predictor.calibrated(probs)
        refer = calibration.refer_verdict(calibrated, predictor.refer_threshold())
        for row, c, r in zip(rows, calibrated, refer):
            row["confidence_calibrated"] = float(c.max())
            row["uncertain_refer"] = bool(r)
    return rows
