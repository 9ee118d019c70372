"""The review queue: logged predictions for an editor to review, the ones most worth a look first.

First those the model referred ("uncertain, refer"), then by the model's lowest confidence, newest
first among equals; filtered by run, by when they were made and by the model's class. Each item
carries the image where it is kept (by content, under APP_HOME/prediction_images: every image with
PREDICTION_LOG_IMAGES=1, the referred ones with REVIEWS=1) or says it was not kept, and the reviews
it has, so that a second reviewer's disagreement shows.

Only editors read the queue (file names and images may identify patients), with REVIEWS=1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from core.access.accounts import User
from core.config import Settings
from core.inference import prediction_log
from core.inference.prediction_log import LoggedPrediction, LogValues
from core.review.store import ReviewRecord, cases, require_reviews

# Logged predictions read per look at the queue (newest first, within the filters), then ordered.
SCAN = 5000
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class QueueFilters:
    """Which logged predictions the queue holds."""

    run_id: int | None = None
    since: datetime | None = None  # UTC, inclusive
    until: datetime | None = None  # UTC, exclusive
    predicted: str | None = None  # the model's class
    unreviewed_only: bool = True  # leave out those the reviewer has reviewed already


@dataclass(frozen=True)
class QueueItem:
    """One logged prediction to review."""

    prediction: LoggedPrediction
    image_path: Path | None  # the kept image; None: not kept
    reviews: tuple[ReviewRecord, ...] = field(default=())

    @property
    def referred(self) -> bool:
        return self.prediction.refer is True

    @property
    def confidence(self) -> float:
        return self.prediction.probabilities[self.prediction.predicted]

    @property
    def classes(self) -> tuple[str, ...]:
        """The model's classes: the true classes a reviewer may choose from."""
        return tuple(self.prediction.probabilities)

    @property
    def disagreement(self) -> bool:
        return len({r.verdict for r in self.reviews}) > 1

    def review_by(self, reviewer: str) -> ReviewRecord | None:
        return next((r for r in self.reviews if r.reviewer == reviewer), None)


@dataclass(frozen=True)
class ReviewQueue:
    items: tuple[QueueItem, ...]
    matched: int  # logged predictions within the filters (of the SCAN newest)
    scanned_all: bool  # False: more than SCAN matched, and only the newest SCAN were ordered
    choices: LogValues  # the runs and classes the filters offer


def review_queue(
    session: Session, settings: Settings, user: User, filters: QueueFilters | None = None, limit: int = DEFAULT_LIMIT
) -> ReviewQueue:
    """The queue for `user` (an editor; UserError otherwise, or with REVIEWS=0): the first `limit` items."""
    require_reviews(settings, user, "review predictions")
    filters = filters or QueueFilters()
    rows = prediction_log.list_predictions(
        session,
        since=filters.since,
        until=filters.until,
        run_id=filters.run_id,
        predicted=filters.predicted,
        limit=SCAN,
        reader=user,
    )
    reviews = {c.log_id: c.reviews for c in cases(session, log_ids=[r.id for r in rows])}
    items = [QueueItem(r, kept_image(settings, r.image_sha256), reviews.get(r.id, ())) for r in rows]
    if filters.unreviewed_only:
        items = [item for item in items if item.review_by(user.name) is None]
    items.sort(key=lambda item: (not item.referred, item.confidence, -item.prediction.at.timestamp()))
    return ReviewQueue(
        tuple(items[:limit]), len(items), len(rows) < SCAN, prediction_log.logged_values(session, reader=user)
    )


def kept_image(settings: Settings, image_sha256: str) -> Path | None:
    """Where the image of this content is kept, if it is (whichever prediction of it kept it)."""
    path = settings.app_home / prediction_log.stored_path(image_sha256)
    return path if path.is_file() else None


def queue_choices(session: Session, settings: Settings, user: User) -> LogValues:
    """The runs and classes the queue's filters offer (the log's), for `user` (an editor)."""
    require_reviews(settings, user, "review predictions")
    return prediction_log.logged_values(session, reader=user)
