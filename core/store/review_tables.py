"""Reviews of logged predictions: the table behind the Review page (core/review/).

A row says that `reviewer` looked at the image of prediction-log row `log_id` and found its true
class `true_class` (None: they could not tell), with a note. One row per reviewer and logged image:
a reviewer who reviews it again replaces their own row, a second reviewer adds one beside it, so
that two people's verdicts can be compared (and a case they disagree on left out of field accuracy).

The prediction's facts that field accuracy needs (its run, the model's class, whether it was
referred, when it was made) are copied from the log row when the review is recorded: log rows are
pruned after PREDICTION_LOG_DAYS, and a review keeps its meaning without its row. `log_id` is a
plain number for the same reason, as PredictionLog.run_id is.

`blind`: the reviewer chose not to see the model's answer before giving theirs. A verdict given
while seeing it can lean toward it, so field accuracy says how many of its reviews were blind.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, Text, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from core.store.db import NAME_LENGTH, Base, utcnow


class Review(Base):
    """One reviewer's verdict on one logged prediction's image."""

    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("log_id", "reviewer"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    log_id: Mapped[int] = mapped_column(index=True)  # PredictionLog.id
    run_id: Mapped[int] = mapped_column(index=True)  # the model that made the prediction
    image_sha256: Mapped[str] = mapped_column(String(64))
    predicted: Mapped[str] = mapped_column(String(NAME_LENGTH))  # the model's class
    refer: Mapped[bool | None] = mapped_column(default=None)  # the model said "uncertain, refer"
    predicted_at: Mapped[datetime]  # when the prediction was made (UTC)
    reviewer: Mapped[str] = mapped_column(String(NAME_LENGTH))
    reviewed_at: Mapped[datetime] = mapped_column(default=utcnow)
    true_class: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)  # None: cannot tell
    note: Mapped[str] = mapped_column(Text, default="")
    blind: Mapped[bool] = mapped_column(default=False, server_default=false())  # the model's answer hidden
