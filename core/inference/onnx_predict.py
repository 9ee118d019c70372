"""A run's predictor on ONNX Runtime: the CPU engine of core/inference/engine.py.

Same interface and same probabilities as core/inference/predict.py's torch Predictor (the shared
part is PredictorBase), from the run's exported graph (core/inference/onnx_export.py, which holds
the preprocessing and test-time augmentation) and its model file's description. Grad-CAM needs the
torch network's gradients: `torch_predictor()` builds the torch Predictor from the same model file
once, when first asked.

ONNX Runtime's threads spin while waiting for work by default, which on a small machine takes the
cores from torch and the web server between requests; here they sleep instead.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from core.config import Settings
from core.errors import UserError
from core.inference.onnx_export import INPUT, cached_export, read_description
from core.inference.predict import Predictor, PredictorBase, model_file
from core.store.records import CalibrationRecord
from core.training.loop import pick_device
from core.transforms.pipelines import EvalPipeline

log = logging.getLogger(__name__)

SAMPLE_BATCH = 32  # samples per ONNX Runtime call (x4 inside the graph with test-time augmentation)


def make_session(path: Path, device: torch.device) -> ort.InferenceSession:
    """An ONNX Runtime session for `path`: on the CPU, with as many threads as torch uses and no
    spinning; on CUDA the CUDA provider first where this ONNX Runtime has one."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            log.warning(
                "This ONNX Runtime has no CUDA provider (it comes with the onnxruntime-gpu package); "
                "the ONNX model runs on the CPU."
            )
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxPredictor(PredictorBase):
    """A run's model on ONNX Runtime, with the run's evaluation pipeline and calibration."""

    def __init__(
        self, session: ort.InferenceSession, meta: dict[str, Any], model_path: Path, device: torch.device
    ) -> None:
        self.session, self.meta, self.model_path, self.device = session, meta, Path(model_path), device
        self.classes = list(meta["classes"])
        self.pipeline = EvalPipeline(**meta["preparation"])
        self.calibration = CalibrationRecord.from_dict(meta.get("calibration"))
        self.run_id = meta.get("run_id")
        self._torch: Predictor | None = None
        self._torch_lock = threading.Lock()

    @classmethod
    def from_files(cls, onnx_path: Path, model_path: Path, device: str = "auto") -> OnnxPredictor:
        """The predictor of an exported graph and the model file it was exported from."""
        dev = pick_device(device)
        return cls(make_session(Path(onnx_path), dev), read_description(Path(model_path)), model_path, dev)

    @classmethod
    def for_run(cls, settings: Settings, run_id: int, device: str = "auto", *, model_sha: str) -> OnnxPredictor:
        """The predictor of a run's model file (`model_sha`: its sha256), exporting it first unless
        runs/<id>/model.onnx is already of this file."""
        path = model_file(settings, run_id)
        return cls.from_files(cached_export(settings, run_id, path, model_sha), path, device)

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime's execution providers for this model, in order of preference."""
        return self.session.get_providers()

    def sample_probabilities(self, samples: torch.Tensor | np.ndarray) -> np.ndarray:
        x = samples.numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
        x = np.ascontiguousarray(x, dtype=np.uint8)
        out = [self.session.run(None, {INPUT: x[i : i + SAMPLE_BATCH]})[0] for i in range(0, len(x), SAMPLE_BATCH)]
        return np.concatenate(out).astype(np.float64)

    def torch_predictor(self) -> Predictor:
        """The torch Predictor of the same model file (built once; for Grad-CAM, which needs gradients)."""
        with self._torch_lock:
            if self._torch is None:
                predictor = Predictor.from_file(self.model_path, str(self.device))
                if predictor.meta.get("weights_sha256") != self.meta.get("weights_sha256"):
                    raise UserError(f"Run {self.run_id}'s model file changed while it was in use; open the run again.")
                self._torch = predictor
            return self._torch
