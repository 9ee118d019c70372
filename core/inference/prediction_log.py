"""The log of predictions: who classified which image, from where, with which model, and the answer.

One row per image (core/store/db.py::PredictionLog), written by core/inference/service.py for the
Predict page, the API and `python -m core predict --log`. The image itself is kept with
PREDICTION_LOG_IMAGES=1: its bytes under APP_HOME/prediction_images/, named by their sha256 (one
file however often it is classified), counted against MAX_DISK_GB like every file under APP_HOME.
With REVIEWS=1 (the default) the images of the predictions the model referred are kept the same way,
for a reviewer to look at (core/review/), while MAX_DISK_GB leaves room for them (`keep_for_review`).
Rows older than PREDICTION_LOG_DAYS are pruned (`prune`), with the kept images no row names any more.

Who reads which rows (`reader`): file names often carry patient identifiers, so a viewer reads only
the rows of their own predictions and an editor reads every row, on the Predict page's history and
through the API alike. The command line passes no reader: whoever runs it holds the database itself.

No torch: the Predict page's history and the command line read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session

from core.access.accounts import EDITOR, User
from core.access.limits import check_disk
from core.config import Settings
from core.csv_export import csv_text
from core.errors import UserError
from core.store.db import PredictionLog, utcnow
from core.store.files import write_bytes_atomic

SOURCES = ("page", "api", "cli")
KINDS = ("calibrated", "raw")
DEFAULT_LIMIT = 1000


@dataclass(frozen=True)
class LogEntry:
    """One image's prediction, to be logged."""

    user: str
    source: str  # one of SOURCES
    run_id: int
    model_sha256: str
    image_sha256: str
    image_name: str
    width: int
    height: int
    size_bytes: int
    probabilities: dict[str, float]  # class -> probability, of `probability_kind`
    probability_kind: str  # one of KINDS
    predicted: str
    refer: bool | None  # None: the model has no refer band (no calibration)
    threshold: float | None
    stored_path: str | None = None  # relative to APP_HOME, when the image is kept
    refer_target: float | None = None  # the accuracy the threshold promises (at 95% confidence)


@dataclass(frozen=True, kw_only=True)
class LoggedPrediction(LogEntry):
    """A row of the log."""

    id: int
    at: datetime  # UTC


def record(session: Session, entries: Sequence[LogEntry]) -> None:
    """Add one log row per entry (in `session`'s transaction)."""
    for e in entries:
        if e.source not in SOURCES or e.probability_kind not in KINDS:
            raise ValueError(f"source {e.source!r} / probability kind {e.probability_kind!r}")
    session.add_all(
        PredictionLog(
            user=e.user,
            source=e.source,
            run_id=e.run_id,
            model_sha256=e.model_sha256,
            image_sha256=e.image_sha256,
            image_name=e.image_name,
            width=e.width,
            height=e.height,
            size_bytes=e.size_bytes,
            probabilities=dict(e.probabilities),
            probability_kind=e.probability_kind,
            predicted=e.predicted,
            refer=e.refer,
            threshold=e.threshold,
            refer_target=e.refer_target,
            stored_path=e.stored_path,
        )
        for e in entries
    )
    session.flush()


def stored_path(image_sha256: str) -> str:
    """Where a kept image lies, relative to APP_HOME (the folder of Settings.prediction_images_dir)."""
    return f"prediction_images/{image_sha256[:2]}/{image_sha256}"


def check_room(settings: Settings, images: Iterable[tuple[str, int]]) -> None:
    """With PREDICTION_LOG_IMAGES=1, UserError when keeping the images of these (sha256, size) not
    kept yet would pass MAX_DISK_GB. Checked before classifying too, so that nothing is classified
    that cannot be logged."""
    if not settings.prediction_log_images:
        return
    _check_room(settings, images, "keeping the classified images (PREDICTION_LOG_IMAGES=1)")


def _check_room(settings: Settings, images: Iterable[tuple[str, int]], what: str) -> None:
    new = {sha: size for sha, size in images if not (settings.app_home / stored_path(sha)).exists()}
    check_disk(settings, sum(new.values()), what)


def keep_images(
    settings: Settings,
    images: Sequence[tuple[str, bytes]],
    what: str = "keeping the classified images (PREDICTION_LOG_IMAGES=1)",
) -> dict[str, str]:
    """Store each (sha256, bytes) once by content, after checking MAX_DISK_GB for the new ones
    (UserError naming `what` when they do not fit); sha256 -> stored_path."""
    _check_room(settings, [(sha, len(data)) for sha, data in images], what)
    kept = {}
    for sha, data in images:
        kept[sha] = stored_path(sha)
        target = settings.app_home / kept[sha]
        if not target.exists():
            write_bytes_atomic(target, data)
    return kept


def keep_for_review(settings: Settings, images: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """With REVIEWS=1, keep the images of referred predictions ((sha256, bytes)) as keep_images does,
    for a reviewer to see; sha256 -> stored_path. Where MAX_DISK_GB leaves no room for them none is
    kept, and the prediction is answered and logged all the same: the review queue then says its
    image was not kept. Nothing with REVIEWS=0."""
    if not settings.reviews or not images:
        return {}
    try:
        return keep_images(settings, images, "keeping referred images for review (REVIEWS=1)")
    except UserError:
        return {}


def readable_user(reader: User | None, user: str | None = None) -> str | None:
    """The user whose rows `reader` may read under the filter `user` (None: everyone's): a viewer
    only their own, whatever the filter; UserError when a viewer names someone else."""
    if reader is None or reader.role == EDITOR:
        return user
    if user is not None and user != reader.name:
        raise UserError(
            f"{reader.name} is signed in as a viewer, who reads only their own predictions in the log; "
            "an editor reads everyone's."
        )
    return reader.name


def list_predictions(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    run_id: int | None = None,
    user: str | None = None,
    predicted: str | None = None,
    limit: int | None = DEFAULT_LIMIT,
    reader: User | None = None,
) -> list[LoggedPrediction]:
    """Logged predictions, newest first: at or after `since`, before `until` (UTC), of one run,
    user or predicted class; at most `limit` (None: all); only those `reader` may read (readable_user)."""
    user = readable_user(reader, user)
    query = select(PredictionLog).order_by(PredictionLog.at.desc(), PredictionLog.id.desc())
    if since is not None:
        query = query.where(PredictionLog.at >= since)
    if until is not None:
        query = query.where(PredictionLog.at < until)
    if run_id is not None:
        query = query.where(PredictionLog.run_id == run_id)
    if user is not None:
        query = query.where(PredictionLog.user == user)
    if predicted is not None:
        query = query.where(PredictionLog.predicted == predicted)
    if limit is not None:
        query = query.limit(limit)
    return [_logged(row) for row in session.scalars(query)]


@dataclass(frozen=True)
class LogValues:
    """The users, runs and predicted classes that occur in the log (the choices of its filters)."""

    users: tuple[str, ...]
    run_ids: tuple[int, ...]
    predicted: tuple[str, ...]


def logged_values(session: Session, reader: User | None = None) -> LogValues:
    """The values of the rows `reader` may read (readable_user)."""
    user = readable_user(reader)

    def distinct(column) -> tuple:
        query = select(column).distinct().order_by(column)
        return tuple(session.scalars(query if user is None else query.where(PredictionLog.user == user)))

    return LogValues(distinct(PredictionLog.user), distinct(PredictionLog.run_id), distinct(PredictionLog.predicted))


def _logged(row: PredictionLog) -> LoggedPrediction:
    return LoggedPrediction(
        user=row.user,
        source=row.source,
        run_id=row.run_id,
        model_sha256=row.model_sha256,
        image_sha256=row.image_sha256,
        image_name=row.image_name,
        width=row.width,
        height=row.height,
        size_bytes=row.size_bytes,
        probabilities={str(k): float(v) for k, v in row.probabilities.items()},
        probability_kind=row.probability_kind,
        predicted=row.predicted,
        refer=row.refer,
        threshold=row.threshold,
        refer_target=row.refer_target,
        stored_path=row.stored_path,
        id=row.id,
        at=row.at,
    )


CSV_FIELDS = (
    "at",
    "user",
    "source",
    "run_id",
    "model_sha256",
    "image_name",
    "image_sha256",
    "width",
    "height",
    "size_bytes",
    "predicted",
    "probability_kind",
    "refer",
    "refer_threshold",
    "refer_target",
)


def logged_record(r: LoggedPrediction) -> dict:
    """A row in the vocabulary of core/inference/service.py's PREDICTION_FIELDS (the API's /predict
    answers the same names), with when, who and through what; not where a kept image lies."""
    return {
        "id": r.id,
        "at": r.at,
        "user": r.user,
        "source": r.source,
        "image_name": r.image_name,
        "image_sha256": r.image_sha256,
        "width": r.width,
        "height": r.height,
        "size_bytes": r.size_bytes,
        "predicted": r.predicted,
        "probabilities": dict(r.probabilities),
        "probability_kind": r.probability_kind,
        "refer": r.refer,
        "refer_threshold": r.threshold,
        "refer_target": r.refer_target,
        "run_id": r.run_id,
        "model_sha256": r.model_sha256,
    }


def to_csv(rows: Sequence[LoggedPrediction]) -> str:
    """The rows as CSV: the fields of CSV_FIELDS, then one column per class (every class any row has).
    File, user and class names are outside text: core/csv_export.py keeps a spreadsheet from running them."""
    classes = sorted({c for r in rows for c in r.probabilities})

    def fields(r: LoggedPrediction) -> list:
        return [
            r.at.isoformat(timespec="seconds"),
            r.user,
            r.source,
            r.run_id,
            r.model_sha256,
            r.image_name,
            r.image_sha256,
            r.width,
            r.height,
            r.size_bytes,
            r.predicted,
            r.probability_kind,
            "" if r.refer is None else int(r.refer),
            "" if r.threshold is None else f"{r.threshold:.4f}",
            "" if r.refer_target is None else f"{r.refer_target:g}",
            *("" if c not in r.probabilities else f"{r.probabilities[c]:.4f}" for c in classes),
        ]

    return csv_text([*CSV_FIELDS, *classes], map(fields, rows))


def prune(session: Session, settings: Settings) -> int:
    """Delete the rows older than PREDICTION_LOG_DAYS (none when it is 0); the number deleted. Kept
    images that no remaining row names are removed once the transaction commits, so that a rollback
    never leaves a row without its image."""
    days = settings.prediction_log_days
    if days < 0:
        raise UserError(f"PREDICTION_LOG_DAYS is {days}; it must be 0 (keep for ever) or a number of days.")
    if days == 0:
        return 0
    cutoff = utcnow() - timedelta(days=days)
    old = PredictionLog.at < cutoff
    paths = set(session.scalars(select(PredictionLog.stored_path).where(old, PredictionLog.stored_path.is_not(None))))
    deleted = session.execute(delete(PredictionLog).where(old)).rowcount or 0
    if paths:
        still = set(session.scalars(select(PredictionLog.stored_path).where(PredictionLog.stored_path.in_(paths))))
        _remove_after_commit(session, [settings.app_home / p for p in paths - still])
    return deleted


def _remove_after_commit(session: Session, paths: list[Path]) -> None:
    def remove(_session: Session) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    event.listen(session, "after_commit", remove, once=True)
