"""Which engine runs a trained model, and the process's few loaded predictors.

`get_predictor` is how the Predict page and the command line get a run's predictor: built once per
model file (keyed by its sha256, so a retrained run's new file is loaded anew) and engine, and kept
in a small LRU shared by every thread of the process (a few DenseNet-201s, ~80 MB each).

INFERENCE_ENGINE (core/config.py) chooses the engine:
    torch        core/inference/predict.py::Predictor, the eager model (compiled on CUDA)
    onnxruntime  core/inference/onnx_predict.py::OnnxPredictor, the run's network exported to ONNX
                 (core/inference/onnx_export.py) and run by ONNX Runtime: one 1388x1040 image in
                 94 ms against eager torch's 223 ms on a 2-core CPU (bench/predict.py measures it)
    auto         ONNX Runtime on the CPU, torch on CUDA (where compiled torch with CUDA graphs is the
                 faster of the two)
Both predictors give the same probabilities (tests/test_onnx.py) and have the same interface; an
OnnxPredictor builds the torch one on demand (`torch_predictor()`) for Grad-CAM.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from core.config import Settings
from core.errors import UserError

ENGINES = ("auto", "torch", "onnxruntime")
CACHE_SIZE = 4

_cache: OrderedDict[tuple, Any] = OrderedDict()
_cache_lock = threading.Lock()
_build_locks: dict[tuple, threading.Lock] = {}


def engine_name(settings: Settings, device: str = "auto") -> str:
    """ "torch" or "onnxruntime": INFERENCE_ENGINE, with "auto" resolved for `device`."""
    name = settings.inference_engine
    if name not in ENGINES:
        raise UserError(f"INFERENCE_ENGINE={name!r} is not an engine; use one of {', '.join(ENGINES)}.")
    if name != "auto":
        return name
    from core.training.loop import pick_device

    return "torch" if pick_device(device).type == "cuda" else "onnxruntime"


def get_predictor(session, settings: Settings, run_id: int, device: str = "auto"):
    """The predictor of a succeeded run (UserError for any other), with the configured engine, from
    the cache when this model file was loaded before. The run is checked on every call (its status
    and that the file is its own); only building the predictor is cached."""
    from core.inference.predict import check_model_owner, model_sha256, usable_model_file
    from core.training.loop import pick_device

    run, path = usable_model_file(session, settings, run_id)
    dev = str(pick_device(device))
    engine = engine_name(settings, dev)
    sha = model_sha256(settings, run_id)
    key = (sha, engine, dev)
    predictor = _lookup(key)
    if predictor is None:
        with _build_lock(key):
            predictor = _lookup(key)  # another thread may have built it meanwhile
            if predictor is None:
                predictor = _build(settings, run_id, path, engine, dev, sha)
                _store(key, predictor)
    check_model_owner(predictor.meta, run)
    return predictor


def _build(settings: Settings, run_id: int, path, engine: str, device: str, sha: str):
    if engine == "torch":
        from core.inference.predict import Predictor

        return Predictor.from_file(path, device)
    from core.inference.onnx_predict import OnnxPredictor

    return OnnxPredictor.for_run(settings, run_id, device, model_sha=sha)


def _lookup(key: tuple):
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    return None


def _store(key: tuple, predictor) -> None:
    with _cache_lock:
        _cache[key] = predictor
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            old, _ = _cache.popitem(last=False)
            _build_locks.pop(old, None)


def _build_lock(key: tuple) -> threading.Lock:
    # One lock per model: two requests for the same new model build it once, while a model that is
    # already loaded is served without waiting for another one's build.
    with _cache_lock:
        return _build_locks.setdefault(key, threading.Lock())


def clear_cache() -> None:
    """Forget every loaded predictor (tests; a process that wants its memory back)."""
    with _cache_lock:
        _cache.clear()
        _build_locks.clear()
