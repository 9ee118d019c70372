"""Runs side by side (the settings in which they differ), the approved models, and the log of
predictions as the Predict page's History tab reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from core.access.accounts import User
from core.inference import approval, prediction_log
from core.jobs.views.runs import PAPER_AUGMENTATION, RunRow
from core.training.run_config import settings_fields


@dataclass(frozen=True)
class SettingDifference:
    """One setting that differs between the runs compared, and its value in each."""

    setting: str
    help: str
    values: tuple[str, ...]  # in the order of the runs


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "when the dataset has specimen groups"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_differences(rows: Sequence[RunRow]) -> list[SettingDifference]:
    """The settings in which `rows` differ (each augmentation value apart), side by side; empty
    when they were trained alike."""
    table: list[tuple[str, str, list[str]]] = [
        ("Dataset", "", [r.dataset for r in rows]),
        ("Protocol", "how the images were split before training", [r.protocol for r in rows]),
        ("Augmentation preset", "the preset whose values it trained with", [r.augmentation for r in rows]),
    ]
    for f in settings_fields():
        if f.name in ("dataset", "augmentation", "grouped"):
            continue  # shown above, by name
        values = [r.weights if f.name == "weights" else _value_text(getattr(r.config, f.name)) for r in rows]
        table.append((f.metadata.get("label", f.name), f.metadata.get("help", ""), values))
    table.append(("Fold", "which fold of its k-fold experiment", [str(r.fold + 1) for r in rows]))
    for key in PAPER_AUGMENTATION:
        table.append(
            (
                f"Augmentation: {key.replace('_', ' ')}",
                "a value of the augmentation preset",
                [_value_text(r.config.augment_params.to_dict()[key]) for r in rows],
            )
        )
    return [SettingDifference(name, help_, tuple(values)) for name, help_, values in table if len(set(values)) > 1]


# ---------------------------------------------------------------------------------------------
# Approved models and the log of predictions


@dataclass(frozen=True)
class ApprovalPanel:
    """The approved model of each class set and every approval made: the Runs page."""

    current: tuple[approval.ApprovalRecord, ...]  # in force, newest first
    history: tuple[approval.ApprovalRecord, ...]  # all, newest first

    @property
    def approved_run_ids(self) -> dict[tuple[str, ...], int]:
        """Class set (sorted names) -> the approved run, for the class sets whose run still exists."""
        return {a.classes: a.run_id for a in self.current if a.run_id is not None}

    def of_run(self, run_id: int) -> approval.ApprovalRecord | None:
        """The approval in force of run `run_id`, when it is approved."""
        return next((a for a in self.current if a.run_id == run_id), None)

    @property
    def default(self) -> approval.ApprovalRecord | None:
        """The approval a classification without a named run uses (service.resolve_run)."""
        return self.current[0] if self.current else None


def approval_panel(session: Session) -> ApprovalPanel:
    history = tuple(approval.approval_history(session))
    return ApprovalPanel(tuple(a for a in history if a.current), history)


@dataclass(frozen=True)
class PredictionHistory:
    """Logged predictions under the chosen filters, and the values the filters offer: the Predict
    page's History tab."""

    rows: tuple[prediction_log.LoggedPrediction, ...]  # newest first
    limit: int | None
    choices: prediction_log.LogValues

    @property
    def truncated(self) -> bool:
        """Whether more rows match than are shown."""
        return self.limit is not None and len(self.rows) >= self.limit

    @property
    def classes(self) -> tuple[str, ...]:
        """Every class any shown row has a probability for (the table's probability columns)."""
        return tuple(sorted({c for r in self.rows for c in r.probabilities}))

    def csv(self) -> str:
        return prediction_log.to_csv(self.rows)


def prediction_history(
    session: Session,
    *,
    reader: User | None,
    since: datetime | None = None,
    until: datetime | None = None,
    run_id: int | None = None,
    user: str | None = None,
    predicted: str | None = None,
    limit: int | None = prediction_log.DEFAULT_LIMIT,
) -> PredictionHistory:
    """The rows and filter values that `reader` may read (a viewer: their own; prediction_log.readable_user)."""
    rows = prediction_log.list_predictions(
        session, since=since, until=until, run_id=run_id, user=user, predicted=predicted, limit=limit, reader=reader
    )
    return PredictionHistory(tuple(rows), limit, prediction_log.logged_values(session, reader))
