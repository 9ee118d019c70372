"""Managing recorded runs: delete one with its files, queue a failed or cancelled one again, and
remember up to when each user has seen the runs that failed.

Each change is one conditional statement, so that it and the worker take turns through the
database: a delete removes only a run that is not running (a worker claiming the run at the same
moment either takes it first, and the delete is refused, or finds it gone and takes nothing), and a
run queued again is reopened only from the state it was read in (core/jobs/queue.py reopen, the
same function as `python -m core resume RUN --background`). No torch here: the pages call it.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_disk, check_queue, check_user_queue
from core.config import Settings
from core.errors import UserError
from core.jobs import queue
from core.store.db import FailuresSeen, ModelApproval, Run, RunStatus
from core.store.runs import get_run, run_dir

# core/jobs/recording.py CHECKPOINT, named here too because that module imports torch. A run queued
# again continues after the epoch this file holds; without it, it starts from the beginning.
RESUME_FILE = "last.pt"
REQUEUABLE = (RunStatus.failed, RunStatus.cancelled)


def resumable(settings: Settings, run_id: int) -> bool:
    """Whether queueing run `run_id` again continues from a finished epoch (else it starts afresh)."""
    return (run_dir(settings, run_id) / RESUME_FILE).exists()


def delete_run(session: Session, settings: Settings, run_id: int, *, user: User) -> None:
    """Delete a run that is not running: its row, with its epochs and predictions (the database
    cascades), and once the caller commits, its folder runs/<id> (checkpoints, logs, model file).

    `user` must be an editor. Refused (UserError) while the run is running, and while
    its model is the approved one of its classes (core/inference/approval.py): withdraw that first.
    A folder left behind by a crash right after the commit is a `run_folder` leftover to
    `python -m core check --fix` (core/store/consistency.py).
    """
    require_editor(user, "delete runs")
    get_run(session, run_id)  # UserError when there is no such run
    approved = select(ModelApproval.id).where(ModelApproval.run_id == run_id, ModelApproval.withdrawn_at.is_(None))
    if session.scalar(approved.limit(1)) is not None:
        raise UserError(
            f"Run {run_id} is the approved model of its classes; withdraw its approval "
            f"(`python -m core withdraw {run_id}`) before deleting it.",
            page=f"Run {run_id} is the approved model of its classes; withdraw its approval "
            "(under Approved model, on this page) before deleting it.",
        )
    # The condition is the lock: a worker's claim and this delete cannot both succeed.
    gone = session.execute(
        delete(Run)
        .where(Run.id == run_id, Run.status != RunStatus.running)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not gone:
        if session.scalar(select(Run.id).where(Run.id == run_id)) is None:
            raise UserError(f"Run {run_id} has just been deleted.")
        raise UserError(
            f"Run {run_id} is running; cancel it first (`python -m core cancel {run_id}`), then "
            "delete it once it has stopped.",
            page=f"Run {run_id} is running: press Cancel run first, then delete it once it has stopped.",
        )
    _remove_after_commit(session, run_dir(settings, run_id))


def _remove_after_commit(session: Session, folder: Path) -> None:
    """Remove `folder` once the session commits (a rollback keeps it, with its row)."""
    state = {"rolled_back": False}

    def remove(_session: Session) -> None:
        if not state["rolled_back"]:
            shutil.rmtree(folder, ignore_errors=True)

    def cancel(_session: Session) -> None:
        state["rolled_back"] = True

    event.listen(session, "after_commit", remove, once=True)
    event.listen(session, "after_rollback", cancel, once=True)


def requeue_run(session: Session, settings: Settings, run_id: int, *, user: User) -> bool:
    """Queue a failed or cancelled run again: it continues after its last finished epoch when it
    has a checkpoint (True), else it starts from the beginning (False). The same reopening as
    `python -m core resume RUN --background`, under the queue's limits as a new run would be."""
    require_editor(user, "queue runs")
    run = get_run(session, run_id)
    if run.status not in REQUEUABLE:
        raise UserError(f"Run {run_id} is {run.status.value}; only a failed or cancelled run can be queued again.")
    queued = session.scalar(select(func.count()).select_from(Run).where(Run.status == RunStatus.queued))
    check_queue(settings, queued, 1)
    mine = session.scalar(
        select(func.count()).select_from(Run).where(Run.status == RunStatus.queued, Run.created_by == user.name)
    )
    check_user_queue(settings, user.name, mine, 1)
    check_disk(settings)
    queue.reopen(session, settings, run_id)
    return resumable(settings, run_id)


def mark_failures_seen(session: Session, user: str, until: datetime) -> None:
    """`user` has seen the runs that failed up to `until` (the newest one shown to them); only
    ever moves forward, so a page drawn earlier cannot hide a failure seen later."""
    moved = session.execute(
        update(FailuresSeen).where(FailuresSeen.user == user, FailuresSeen.seen_until < until).values(seen_until=until)
    ).rowcount
    if moved or session.get(FailuresSeen, user) is not None:
        return
    try:
        with session.begin_nested():  # two tabs dismissing at once: the second finds the row
            session.add(FailuresSeen(user=user, seen_until=until))
    except IntegrityError:
        session.execute(
            update(FailuresSeen)
            .where(FailuresSeen.user == user, FailuresSeen.seen_until < until)
            .values(seen_until=until)
        )
