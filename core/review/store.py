"""Reviews recorded and read: who said which true class of which logged prediction, when, and why.

One review per reviewer and logged image (core/store/review_tables.py): reviewing it again replaces
one's own verdict, another reviewer's verdict is kept beside it. A case is a logged prediction with
its reviews together: it has a true class when every review names the same class, is in
disagreement when reviews differ (two classes, or a class and "cannot tell"), and counts for neither
field accuracy nor new data then.

Only editors review, and only with REVIEWS=1: a viewer is refused here, not only on the page.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_name_length, check_text
from core.config import Settings
from core.errors import UserError
from core.store.db import PredictionLog, utcnow
from core.store.review_tables import Review

CANNOT_TELL = "cannot tell"
MAX_NOTE = 2000  # characters of a review's note


@dataclass(frozen=True)
class ReviewRecord:
    """One reviewer's verdict on one logged prediction."""

    id: int
    log_id: int
    run_id: int
    image_sha256: str
    predicted: str  # the model's class
    refer: bool | None
    predicted_at: datetime
    reviewer: str
    reviewed_at: datetime
    true_class: str | None  # None: the reviewer could not tell
    note: str
    blind: bool  # given without seeing the model's answer

    @property
    def verdict(self) -> str:
        """The true class, or CANNOT_TELL."""
        return CANNOT_TELL if self.true_class is None else self.true_class

    @property
    def overruled(self) -> bool:
        """The reviewer named a class other than the model's."""
        return self.true_class is not None and self.true_class != self.predicted


@dataclass(frozen=True)
class Case:
    """A logged prediction and all its reviews (at least one)."""

    log_id: int
    run_id: int
    image_sha256: str
    predicted: str
    refer: bool | None
    predicted_at: datetime
    reviews: tuple[ReviewRecord, ...]  # oldest first

    @property
    def disagreement(self) -> bool:
        return len({r.verdict for r in self.reviews}) > 1

    @property
    def true_class(self) -> str | None:
        """The class every review names; None when one could not tell or two disagree."""
        verdicts = {r.true_class for r in self.reviews}
        return next(iter(verdicts)) if len(verdicts) == 1 else None

    @property
    def cannot_tell(self) -> bool:
        return all(r.true_class is None for r in self.reviews)


def require_reviews(settings: Settings, user: User, action: str = "review predictions") -> None:
    """UserError unless reviews are on (REVIEWS=1) and `user` is an editor."""
    if not settings.reviews:
        raise UserError("Reviews are switched off on this server (REVIEWS=0); an administrator can switch them on.")
    require_editor(user, action)


def record_review(
    session: Session,
    settings: Settings,
    user: User,
    log_id: int,
    true_class: str | None,
    note: str = "",
    *,
    blind: bool = False,
) -> ReviewRecord:
    """Record `user`'s verdict on logged prediction `log_id`: `true_class`, one of the model's classes,
    or None for "cannot tell", with `note`; `blind`: given without seeing the model's answer. Replaces
    the user's own earlier review of it; other reviewers' reviews stay. UserError for a viewer, with REVIEWS=0, for a prediction no longer in
    the log, a class the model does not have, or a note too long."""
    require_reviews(settings, user)
    check_name_length(user.name, "User name")
    note = check_text(note.strip(), "Note")
    if len(note) > MAX_NOTE:
        raise UserError(f"A review's note is limited to {MAX_NOTE} characters; this one has {len(note)}.")
    logged = session.get(PredictionLog, log_id)
    if logged is None:
        raise UserError(f"Prediction {log_id} is not in the log (pruned after PREDICTION_LOG_DAYS, or never logged).")
    classes = list(logged.probabilities)
    if true_class is not None and true_class not in classes:
        raise UserError(
            f"The model of run {logged.run_id} knows {', '.join(classes)}; {true_class} is not one of them."
        )
    verdict = {"true_class": true_class, "note": note, "blind": blind, "reviewed_at": utcnow()}
    # One statement that inserts or replaces: two requests of one reviewer at once (two tabs, an API
    # call sent again) leave one review, the later one, and neither fails on the other's row.
    upsert = (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(Review)
    session.execute(
        upsert.values(
            log_id=log_id,
            run_id=logged.run_id,
            image_sha256=logged.image_sha256,
            predicted=logged.predicted,
            refer=logged.refer,
            predicted_at=logged.at,
            reviewer=user.name,
            **verdict,
        ).on_conflict_do_update(index_elements=["log_id", "reviewer"], set_=verdict)
    )
    row = session.scalars(
        select(Review)
        .where(Review.log_id == log_id, Review.reviewer == user.name)
        .execution_options(populate_existing=True)
    ).one()
    return _record(row)


def cases(session: Session, *, run_id: int | None = None, log_ids: Iterable[int] | None = None) -> list[Case]:
    """The reviewed cases of run `run_id` (None: every run), or of the logged predictions `log_ids`;
    by log id."""
    query = select(Review).order_by(Review.log_id, Review.reviewed_at, Review.id)
    if run_id is not None:
        query = query.where(Review.run_id == run_id)
    if log_ids is not None:
        query = query.where(Review.log_id.in_(list(log_ids)))
    grouped: dict[int, list[ReviewRecord]] = {}
    for row in session.scalars(query):
        grouped.setdefault(row.log_id, []).append(_record(row))
    return [_case(reviews) for reviews in grouped.values()]


def _case(reviews: list[ReviewRecord]) -> Case:
    first = reviews[0]
    return Case(
        first.log_id, first.run_id, first.image_sha256, first.predicted, first.refer, first.predicted_at, tuple(reviews)
    )


def _record(row: Review) -> ReviewRecord:
    return ReviewRecord(
        id=row.id,
        log_id=row.log_id,
        run_id=row.run_id,
        image_sha256=row.image_sha256,
        predicted=row.predicted,
        refer=row.refer,
        predicted_at=row.predicted_at,
        reviewer=row.reviewer,
        reviewed_at=row.reviewed_at,
        true_class=row.true_class,
        note=row.note,
        blind=row.blind,
    )
