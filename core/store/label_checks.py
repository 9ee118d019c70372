"""Labels an editor has checked and kept: the table behind "confirm" in the list of suspected label
errors (core/evaluation/label_issues.py).

A row says that `checked_by` looked at image `image_id` of a dataset while reviewing version `version`
and found its class `label` right. The image is then left out of the suspects of that version and of
every later one, for as long as its class there is still `label`: a relabel since puts it back on the
list, to be judged again under its new class. Rows are never changed; a second confirmation adds a row.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from core.store.db import NAME_LENGTH, Base, utcnow


class LabelCheck(Base):
    """An image's class confirmed by an editor in a version of its dataset."""

    __tablename__ = "label_checks"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    version: Mapped[int]  # the number of the dataset version reviewed
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))  # the class confirmed
    checked_by: Mapped[str] = mapped_column(String(NAME_LENGTH))
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)
