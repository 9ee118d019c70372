"""The run records: `create_runs` records what to do (one run, or one per fold for k-fold), and the
reads the pages and the command line need. No torch here: a page that lists runs stays light.

Running a recorded run is core/jobs/execute.py (`execute_run`); the CLI calls both in the
foreground, the worker (core/jobs/worker.py) calls `execute_run` in a child process.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_disk, check_name_length, check_queue, check_text, check_user_queue
from core.config import Settings
from core.data import splits
from core.data.datasets import get_dataset, lock_dataset
from core.errors import UserError
from core.store.db import Run, RunStatus
from core.training.run_config import RunConfig

MAX_NOTES = 4000  # characters of a run's notes


def create_runs(
    session: Session,
    settings: Settings,
    config: RunConfig,
    *,
    user: User,
    name: str | None = None,
    notes: str | None = None,
) -> list[Run]:
    """Record queued runs for `config`: one, or one per fold for k-fold. Makes (or reuses) the split,
    over the dataset version the config names (the latest when it names none), whose number the runs'
    configs record. UserError when the dataset has no such version.

    `user` must be an editor; the runs record their name as created_by. Refused
    (UserError, nothing recorded) when the queue would hold more than MAX_QUEUED_RUNS runs, or the
    user's queued runs more than MAX_QUEUED_RUNS_PER_USER, or the files under APP_HOME use more than
    MAX_DISK_GB. `name` and `notes` are the person's own words for the runs (k-fold folds share them).
    """
    name = check_name_length(name.strip(), "Run name") if name and name.strip() else None
    notes = check_text(notes.strip(), "Notes") or None if notes else None
    if notes is not None and len(notes) > MAX_NOTES:
        raise UserError(f"Notes are limited to {MAX_NOTES} characters; these have {len(notes)}.")
    require_editor(user, "launch training runs")
    check_name_length(user.name, "User name")
    # Locked until the caller commits: a delete of the dataset waits for these runs, or they find it gone.
    dataset = lock_dataset(session, get_dataset(session, config.dataset))
    adding = config.folds if config.split == "kfold" else 1
    queued = session.scalar(select(func.count()).select_from(Run).where(Run.status == RunStatus.queued))
    check_queue(settings, queued, adding)
    mine = session.scalar(
        select(func.count()).select_from(Run).where(Run.status == RunStatus.queued, Run.created_by == user.name)
    )
    check_user_queue(settings, user.name, mine, adding)
    check_disk(settings)
    split = splits.make_split(
        session,
        dataset,
        protocol=config.split,
        seed=config.seed,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        folds=config.folds,
        grouped=config.grouped,
        version=config.dataset_version,
        frozen_test_of_run=config.frozen_test_of_run,
    )
    folds = range(config.folds) if config.split == "kfold" else [config.fold]
    experiment = uuid.uuid4().hex
    runs = [
        Run(
            dataset_id=dataset.id,
            split_id=split.id,
            fold=fold,
            experiment=experiment,
            config=config.replace(fold=fold, grouped=split.grouped, dataset_version=split.params["version"]).to_dict(),
            seed=config.seed,
            status=RunStatus.queued,
            created_by=user.name,
            name=name,
            notes=notes,
        )
        for fold in folds
    ]
    session.add_all(runs)
    session.flush()
    return runs
