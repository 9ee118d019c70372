"""Runs made by hand for tests of what comes after training: a run's row and, if asked, the model
file training would leave, with no training."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import select

from core.config import Settings
from core.inference.model_file import write_model
from core.store.db import Dataset, Run, RunStatus, utcnow
from core.store.engine import make_sessionmaker
from core.store.runs import model_path


def add_run(
    settings: Settings,
    *,
    dataset: str,
    classes: Sequence[str],
    config: dict[str, Any],
    status: RunStatus = RunStatus.succeeded,
    seed: int = 0,
    experiment: str | None = None,
    created: datetime | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> int:
    """A run of `dataset` and its id.

    The dataset row is made with `classes` when no dataset has that name. The run's row has `config`,
    `seed`, `status`, `experiment` (default "DATASET-TIMESTAMP") and was created at `created`
    (default now). With `weights`, the run gets a model file at its place under APP_HOME, whose
    description is the run's id, its creation time, `classes` and `config`, then `meta` (its keys
    replace those: a "config" other than the row's, say).
    """
    created = created or utcnow()
    with make_sessionmaker(settings.database_url).begin() as s:
        found = s.scalar(select(Dataset).where(Dataset.name == dataset))
        if found is None:
            found = Dataset(name=dataset, classes=list(classes))
            s.add(found)
            s.flush()
        run = Run(
            dataset_id=found.id,
            experiment=experiment or f"{dataset}-{utcnow().timestamp()}",
            config=config,
            seed=seed,
            status=status,
            created_at=created,
        )
        s.add(run)
        s.flush()
        run_id = run.id
    if weights is not None:
        description = {"run_id": run_id, "run_created": created.isoformat(), "classes": list(classes), "config": config}
        write_model(model_path(settings, run_id), weights, {**description, **(meta or {})})
    return run_id
