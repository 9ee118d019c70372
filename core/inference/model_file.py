"""The model file: what a succeeded run keeps for use, runs/<id>/model.safetensors.

One safetensors file (a JSON header, then the raw tensors; reading it runs no code, unlike a pickle):
the fp32 weights of the trained network (the best epoch's), and in the header's metadata, under
META_KEY, one JSON object with everything prediction needs, so that a predictor is built from this
file alone, without the database, the settings or the training images:

    format         FORMAT
    weights_sha256 sha256 of the weights' bytes, tensor by tensor in name order (`python -m core check
                   --deep` and `read_model` compare it with the file's)
    run_id, run_created, dataset {name, fingerprint, n_images}
                   where it came from; the fingerprint is `dataset_fingerprint` of the dataset's images
    classes        the class names, in output order
    preparation    the evaluation pipeline (EvalPipeline.to_dict: image size, tiles, stain method and
                   the fitted normaliser's parameters, test-time augmentation)
    calibration    core.evaluation.calibration.run_calibration: temperature, refer threshold and
                   target, n_val, and the calibrated validation probabilities and labels from which
                   the Predict page chooses a threshold for another target; the run summary's
                   record, read and written only by core/store/records.py CalibrationRecord
    config         the run's RunConfig
    test_metrics   accuracy, n_test and protocol of the run's own test evaluation
    weights        the starting weights used (e.g. "imagenet (torchvision ...)")

No optimiser state: resuming an interrupted run uses its checkpoint (last.pt), not this file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.access.limits import disk_full_error, is_disk_full
from core.errors import UserError
from core.inference.model_meta import FORMAT  # one definition, read there without torch
from core.store.files import atomic_path
from core.store.runs import MODEL_META_KEY as META_KEY
from core.store.runs import model_file_problem


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # On a GPU the weights are channels_last, which safetensors (row-major only) refuses.
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


# What to do about a full disk while a run writes its weights: its checkpoint (last.pt) is kept.
_FULL_THEN = (
    "Free space under APP_HOME (delete datasets or runs that are no longer needed), then "
    "`python -m core resume {run}` continues the run from its last finished epoch."
)
_FULL_THEN_PAGE = (
    "Ask the administrator to free space, or delete datasets or runs that are no longer needed, "
    "then resume the run on the Runs page: it continues from its last finished epoch."
)


def write_weights(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """`state` (a state dict), and `meta` as the header's JSON, to `path` atomically.

    A full disk is the disk-full UserError (core/access/limits.py), which names the file by its name:
    safetensors reports it as a SafetensorError quoting "os error 28", not as an OSError.
    """
    metadata = None if meta is None else {META_KEY: json.dumps(meta)}
    try:
        with atomic_path(path) as tmp:
            save_file(_tensors(state), tmp, metadata=metadata)
    except (SafetensorError, OSError) as exc:
        if not is_disk_full(exc):
            raise
        then = _FULL_THEN.format(run=(meta or {}).get("run_id") or "RUN_ID")
        raise disk_full_error(Path(path).name, Path(path).parent, then=then, page=_FULL_THEN_PAGE) from None


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict on the CPU, the header's JSON or None). UserError for a file that is not one."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = (f.metadata() or {}).get(META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # an OSError's text holds the path
        raise UserError(f"{Path(path).name} is damaged or not a model file ({why}).") from None
    try:
        return state, None if header is None else json.loads(header)
    except json.JSONDecodeError as exc:
        raise UserError(f"{Path(path).name}: its description is damaged ({exc}).") from None


def write_model(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A run's model file: its weights and what prediction needs (see the module docstring)."""
    tensors = _tensors(state)
    digest = hashlib.sha256()
    for name in sorted(tensors):  # the bytes safetensors stores: little-endian, row-major
        digest.update(tensors[name].reshape(-1).view(torch.uint8).numpy())
    write_weights(path, tensors, {"format": FORMAT, "weights_sha256": digest.hexdigest(), **meta})


def read_model(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, description) of a model file; UserError for anything else, or a damaged one."""
    problem = model_file_problem(path)
    if problem is not None:
        raise UserError(f"{Path(path).name} is damaged or not a model file: {problem}.")
    state, meta = read_weights(path)
    if meta is None or meta.get("format") != FORMAT:
        raise UserError(
            f"{Path(path).name} is not a model file of this version "
            f"(format {None if meta is None else meta.get('format')}, expected {FORMAT})."
        )
    return state, meta


def dataset_fingerprint(images: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted lines "IMAGE_SHA256 LABEL" of a dataset's images: equal for the same
    images with the same labels, whatever their names or order."""
    lines = sorted(f"{sha} {label}" for sha, label in images)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
