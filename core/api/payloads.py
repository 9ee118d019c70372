"""The API's JSON bodies, made from the page-ready records of core/jobs/views/ and the prediction
service's results: the same fields the pages show, as plain JSON values (times in ISO 8601, UTC)."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from core.jobs.views import EpochRow, RunCurves, RunRow


def when(value: datetime | None) -> str | None:
    """ISO 8601 with its offset; the database keeps UTC without one."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def plain(value: Any) -> Any:
    """`value` as JSON values: dataclasses as objects, times as ISO 8601, NaN as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return when(value)
    if isinstance(value, Enum):
        return plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, float) or hasattr(value, "__float__"):
        number = float(value)
        return number if math.isfinite(number) else None
    return str(value)


def run_json(row: RunRow) -> dict[str, Any]:
    """One run as the Runs table lists it."""
    fraction, text = row.progress_bar()
    return {
        "id": row.id,
        "status": row.status,
        "label": row.label(),
        "dataset": row.dataset,
        "classes": list(row.classes),
        "protocol": row.protocol,
        "leaky": row.leaky,
        "grouped": row.grouped,
        "experiment": row.experiment,
        "fold": row.fold,
        "seed": row.seed,
        "weights": row.weights,
        "device": row.device,
        "created_at": when(row.created_at),
        "created_by": row.created_by,
        "started_at": when(row.started_at),
        "finished_at": when(row.finished_at),
        "seconds": row.seconds,
        "epochs": row.config.epochs,
        "epochs_done": row.epochs_done,
        "progress": {"fraction": fraction, "text": text},
        "test_accuracy": plain(row.summary.test_accuracy),
        "cancel_requested": row.cancel_requested,
    }


def epoch_json(e: EpochRow) -> dict[str, Any]:
    return plain(e)


def run_detail_json(curves: RunCurves, error: str | None) -> dict[str, Any]:
    """One run with its settings, what it found out, where it is and its epochs: the Runs page's panel."""
    row = curves.run
    return {
        **run_json(row),
        "config": plain(row.config.to_dict()),
        "summary": plain(row.summary.to_dict()),
        "progress_detail": plain(row.progress.to_dict()),
        "error": error,
        "epoch_metrics": [epoch_json(e) for e in curves.epochs],
    }


def model_json(row: RunRow, model_sha256: str | None, approved: bool) -> dict[str, Any]:
    """A succeeded run whose model file can classify images."""
    return {
        "run_id": row.id,
        "label": row.label(),
        "dataset": row.dataset,
        "classes": list(row.classes),
        "image_size": row.config.image_size,
        "protocol": row.protocol,
        "leaky": row.leaky,
        "test_accuracy": plain(row.summary.test_accuracy),
        "calibrated": row.summary.temperature is not None,
        "model_sha256": model_sha256,
        "approved": approved,
        "finished_at": when(row.finished_at),
    }


def classified_json(c: Any) -> dict[str, Any]:
    """One classified image (core.inference.service.Classified), in the one vocabulary of a prediction."""
    from core.inference.service import prediction_record

    return plain(prediction_record(c))


def logged_json(r: Any) -> dict[str, Any]:
    """One row of the prediction log (core.inference.prediction_log.LoggedPrediction), same names."""
    from core.inference.prediction_log import logged_record

    return plain(logged_record(r))


def review_json(r: Any) -> dict[str, Any]:
    """One review (core.review.store.ReviewRecord)."""
    return plain(
        {
            "log_id": r.log_id,
            "run_id": r.run_id,
            "predicted": r.predicted,
            "reviewer": r.reviewer,
            "reviewed_at": r.reviewed_at,
            "true_class": r.true_class,
            "note": r.note,
            "blind": r.blind,
        }
    )


def queue_entry_json(item: Any) -> dict[str, Any]:
    """One prediction of the review queue (core.review.queue.QueueItem): its log row, whether its image
    is kept (never where), and its reviews."""
    return {
        **logged_json(item.prediction),
        "image_kept": item.image_path is not None,
        "reviews": [review_json(r) for r in item.reviews],
        "disagreement": item.disagreement,
    }


def slide_job_json(view, prefix: str) -> dict[str, Any]:
    """A slide job (core/jobs/slide_jobs.py SlideJobView) as the API answers it."""
    left = view.seconds_left()
    body = {
        "id": view.id,
        "run_id": view.run_id,
        "slide_name": view.slide_name,
        "user": view.user,
        "status": view.status.value,
        "created_at": when(view.created_at),
        "started_at": when(view.started_at),
        "finished_at": when(view.finished_at),
        "tiles_done": view.done,
        "tiles_total": view.total,
        "seconds_left": None if left is None else round(left, 1),
        "error": view.error,
        "verdict": plain(view.verdict),
        "url": f"{prefix}/slides/{view.id}",
    }
    if view.verdict is not None:
        body["geojson_url"] = f"{prefix}/slides/{view.id}/geojson"
        body["tiles_csv_url"] = f"{prefix}/slides/{view.id}/tiles.csv"
    return body
