"""Where a run's records and files are: its row, its folder, its model file.

Plain reads, no torch: the pages, the queue and prediction all find a run here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.errors import UserError
from core.store.db import Run

# The one file a succeeded run keeps for use: weights and everything prediction needs
# (core/inference/model_file.py writes and reads it), described under MODEL_META_KEY of its header.
MODEL_FILE = "model.safetensors"
MODEL_META_KEY = "lymphoma_model"


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    return run


def run_dir(settings: Settings, run_id: int) -> Path:
    return settings.runs_dir / str(run_id)


def model_path(settings: Settings, run_id: int) -> Path:
    """The run's model file (present once the run has succeeded)."""
    return run_dir(settings, run_id) / MODEL_FILE


def fold_siblings(session: Session, run: Run) -> list[Run]:
    """The runs of the same k-fold experiment, one per fold (just `run` for a holdout)."""
    return list(session.scalars(select(Run).where(Run.experiment == run.experiment).order_by(Run.fold)))


def model_file_problem(path: Path) -> str | None:
    """Why a model file cannot be used, or None when it is whole: its safetensors header, the length
    of its data, and the sha256 of its weights against the one its description records. Reads the
    file without torch (the consistency check runs without it)."""
    try:
        with open(path, "rb") as f:
            length = f.seek(0, 2)
            f.seek(0)
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= length - 8:
                return f"not a model file (its first bytes announce a {size}-byte header in a {length}-byte file)"
            header = json.loads(f.read(size))
            meta = json.loads(header.pop("__metadata__", {}).get(MODEL_META_KEY) or "{}")
            digest, end = hashlib.sha256(), 0
            for name in sorted(header):
                begin, stop = header[name]["data_offsets"]
                f.seek(8 + size + begin)
                digest.update(f.read(stop - begin))
                end = max(end, stop)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"not a readable model file ({type(exc).__name__}: {exc})"
    if length != 8 + size + end:
        return f"{length} bytes, its header describes {8 + size + end}"
    if meta.get("weights_sha256") != digest.hexdigest():
        return "its weights are not the ones its description records"
    return None
