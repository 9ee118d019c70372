"""A model file's description read without its weights, and without torch: what a check before
queueing (core/jobs/slide_jobs.py) or a page needs, in a process that may never load the model.

The file itself is written and read whole by core/inference/model_file.py, which needs torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from core.errors import UserError
from core.store.runs import MODEL_META_KEY

FORMAT = 1  # the model file's format; core/inference/model_file.py writes it


def read_description(path: Path) -> dict[str, Any]:
    """A model file's description alone. UserError for a file that is not a model file of this version."""
    try:
        with safe_open(str(path), framework="numpy") as f:  # numpy: the header only, no torch
            header = (f.metadata() or {}).get(MODEL_META_KEY)
    except (SafetensorError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"{Path(path).name} is damaged or not a model file ({why}).") from None
    try:
        meta = None if header is None else json.loads(header)
    except json.JSONDecodeError as exc:
        raise UserError(f"{Path(path).name}: its description is damaged ({exc}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{Path(path).name} is not a model file of this version.")
    return meta
