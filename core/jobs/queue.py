"""The job queue: runs are the jobs, their `status` column is the queue.

    queued --claim--> running --> succeeded | failed | cancelled
       ^                 |
       +-- stale sweep --+   (its process stopped beating: requeued, and resumed from last.pt)
       +-- reopen -------- failed | cancelled   (`python -m core resume RUN`)

A worker takes a run with one atomic claim, so two workers never take the same run: on SQLite a
`BEGIN IMMEDIATE` transaction (the database's single write lock) around a conditional update; on
PostgreSQL `SELECT ... FOR UPDATE SKIP LOCKED` then the same update. Rows are never deleted.

Whether a process is alive is judged by the age of its heartbeat, never by a pid file or by how
long a run has taken. Nothing here imports torch, so the worker and the web pages stay light.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.access.limits import is_disk_full
from core.config import Settings
from core.errors import UserError
from core.store.db import EpochMetric, Run, RunStatus, utcnow
from core.store.engine import engine_of, write_transaction
from core.store.records import RunSummary
from core.store.runs import get_run
from core.training.run_config import RunConfig

LOG_TAIL_LINES = 50
# A run whose worker died this many times is failed instead of being requeued again: something
# about it (memory?) probably kills the worker, and retrying for ever would hide that.
MAX_ATTEMPTS = 3


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str | None:
    """The last `lines` lines of a text file (None if there is none); reads only its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 250 * lines))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except FileNotFoundError:
        return None


def note(settings: Settings, run_id: int, message: str) -> None:
    """Append a line to the run's train.log, so that its log tells what the queue did to it."""
    path = settings.runs_dir / str(run_id) / "train.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{utcnow():%Y-%m-%d %H:%M:%S} QUEUE {message}\n")


def _disk_full(exc: BaseException) -> BaseException | None:
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:  # a checkpoint writer may wrap the OSError
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return next((e for e in seen if is_disk_full(e)), None)


def failure_text(exc: BaseException, run_id: int) -> str:
    """What a failed run's `error` says: a UserError's message; for a full disk (a file, or the
    database, that could not be written) a plain sentence and how to go on; else type and text."""
    if isinstance(exc, UserError):
        return str(exc)
    full = _disk_full(exc)
    if full is None:
        return f"{type(exc).__name__}: {exc}"
    why = full.strerror if isinstance(full, OSError) else str(getattr(full, "orig", full))
    return (
        f"The disk is full: {why or full}. Free space under APP_HOME (or on the database's disk), then "
        f"`python -m core resume {run_id}` continues the run from its last finished epoch."
    )


def failure_page_text(exc: BaseException) -> str | None:
    """The same failure in the pages' words (RunSummary.error_page), where they differ from
    failure_text's: the command line's flags and commands become the pages' options and buttons."""
    if isinstance(exc, UserError):
        return exc.page
    if _disk_full(exc) is not None:
        return (
            "The server's disk is full. Ask the administrator to free space, then press Resume on this "
            "page: the run continues from its last finished epoch."
        )
    return None


def age_seconds(moment: datetime | None, now: datetime | None = None) -> float | None:
    return None if moment is None else max(0.0, ((now or utcnow()) - moment).total_seconds())


def claim_next(Session: sessionmaker, worker: str, run_id: int | None = None) -> int | None:
    """Atomically take the oldest queued run (or run `run_id`, if it is queued) for `worker`.

    Returns the run id, or None when there is nothing to take. The run becomes `running`, owned by
    `worker`, with a fresh heartbeat; its pid is cleared until the training process reports it.
    """
    with write_transaction(engine_of(Session)) as conn:
        query = select(Run.id).where(Run.status == RunStatus.queued)
        if run_id is not None:
            query = query.where(Run.id == run_id)
        # SKIP LOCKED: on PostgreSQL a second worker passes over the row the first is taking.
        # SQLite ignores it; BEGIN IMMEDIATE already serialises the claims.
        chosen = conn.scalar(query.order_by(Run.id).limit(1).with_for_update(skip_locked=True))
        if chosen is None:
            return None
        taken = conn.execute(
            update(Run)
            .where(Run.id == chosen, Run.status == RunStatus.queued)
            .values(
                status=RunStatus.running,
                worker=worker,
                pid=None,
                heartbeat_at=utcnow(),
                attempts=Run.attempts + 1,
                finished_at=None,
                error=None,
            )
        ).rowcount
    return chosen if taken == 1 else None


def has_queued(session: Session) -> bool:
    """A cheap read, so an idle worker polls without taking the write lock."""
    return session.scalar(select(Run.id).where(Run.status == RunStatus.queued).limit(1)) is not None


def request_cancel(session: Session, run_id: int) -> RunStatus:
    """Cancel a run: a queued one at once, a running one cooperatively (it stops within seconds,
    keeping its finished epochs). Returns the run's status after the request."""
    get_run(session, run_id)
    # Conditional updates, so a worker claiming the run at this moment cannot be overtaken:
    # either the run is still queued and never starts, or it is running and sees the flag.
    cancelled = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == RunStatus.queued)
        .values(status=RunStatus.cancelled, finished_at=utcnow())
    ).rowcount
    if cancelled:
        return RunStatus.cancelled
    flagged = session.execute(
        update(Run).where(Run.id == run_id, Run.status == RunStatus.running).values(cancel_requested=True)
    ).rowcount
    if flagged:
        return RunStatus.running
    status = session.scalar(select(Run.status).where(Run.id == run_id))
    raise UserError(f"Run {run_id} has already ended ({status.value}); there is nothing to cancel.")


def _stale(settings: Settings, now: datetime):
    cutoff = now - timedelta(seconds=settings.stale_seconds)
    return and_(Run.status == RunStatus.running, or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < cutoff))


def requeue_stale(session: Session, settings: Settings) -> dict[str, list[int]]:
    """Runs marked running whose heartbeat is older than settings.stale_seconds lost their process
    (a killed worker, a crashed machine). Requeue them, to resume from their last checkpoint; a
    run with a pending cancel is cancelled instead, and one that has lost MAX_ATTEMPTS workers is
    failed. Each update re-checks staleness, so a run that beats meanwhile is left alone.
    """
    now = utcnow()
    stale = _stale(settings, now)
    done: dict[str, list[int]] = {"requeued": [], "cancelled": [], "failed": []}
    stale_runs = (
        select(Run.id, Run.attempts, Run.cancel_requested, Run.worker, Run.summary).where(stale).order_by(Run.id)
    )
    for run in session.execute(stale_runs).all():
        if run.cancel_requested:
            outcome, values = "cancelled", {"status": RunStatus.cancelled, "finished_at": now}
        elif run.attempts >= MAX_ATTEMPTS:
            error = (
                f"The process training this run stopped responding {run.attempts} times (last on worker "
                f"{run.worker}); it was not retried again. `python -m core resume {run.id}` tries once more."
            )
            page = (
                f"The process training this run stopped responding {run.attempts} times (out of memory?); it "
                "was not retried again. Resume on this page tries once more."
            )
            summary = RunSummary.from_dict(run.summary).replace(error_page=page).to_dict()
            outcome, values = (
                "failed",
                {"status": RunStatus.failed, "finished_at": now, "error": error, "summary": summary},
            )
        else:
            outcome, values = "requeued", {"status": RunStatus.queued, "worker": None, "pid": None}
        if session.execute(update(Run).where(Run.id == run.id, stale).values(**values)).rowcount:
            done[outcome].append(run.id)
            note(
                settings,
                run.id,
                f"{outcome}: no heartbeat for over {settings.stale_seconds:g} s from "
                f"worker {run.worker} (attempt {run.attempts} of {MAX_ATTEMPTS})",
            )
    return done


def reopen(session: Session, settings: Settings, run_id: int, *, worker: str | None = None) -> None:
    """Resume a failed or cancelled run (or a running one whose process is gone) from its last
    finished epoch: queue it for a worker, or, with `worker`, claim it for that caller directly."""
    run = get_run(session, run_id)
    now = utcnow()
    if run.status == RunStatus.succeeded:
        raise UserError(f"Run {run_id} has already succeeded; there is nothing to resume.")
    if run.status == RunStatus.queued:
        raise UserError(f"Run {run_id} is already queued.")
    if run.status == RunStatus.running and not session.scalar(
        select(Run.id).where(Run.id == run_id, _stale(settings, now))
    ):
        raise UserError(
            f"Run {run_id} is running (heartbeat {age_seconds(run.heartbeat_at, now):.0f} s ago); "
            f"`python -m core cancel {run_id}` first if you want to restart it."
        )
    values: dict[str, Any] = {
        "status": RunStatus.queued,
        "worker": None,
        "pid": None,
        "error": None,
        "finished_at": None,
        "cancel_requested": False,
        "attempts": 0,
        "summary": RunSummary.from_dict(run.summary).replace(error_page=None).to_dict(),
    }
    if worker is not None:
        values.update(status=RunStatus.running, worker=worker, heartbeat_at=now, attempts=1)
    reopened = session.execute(update(Run).where(Run.id == run_id, Run.status == run.status).values(**values)).rowcount
    if not reopened:
        raise UserError(f"Run {run_id} changed while being resumed; try again.")
    note(settings, run_id, "resume requested by hand" + (f"; running in {worker}" if worker else "; queued"))


def run_status(session: Session, run_id: int) -> dict[str, Any]:
    """What `python -m core status RUN` prints: where the run is, its latest epoch, its health."""
    run = get_run(session, run_id)
    last = session.scalars(
        select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch.desc()).limit(1)
    ).first()
    done = session.scalar(select(func.count()).select_from(EpochMetric).where(EpochMetric.run_id == run_id))
    latest = None
    if last is not None:
        latest = {
            "epoch": last.epoch,
            "train_loss": last.train_loss,
            "train_accuracy": last.train_accuracy,
            "val_loss": last.val_loss,
            "val_accuracy": last.val_accuracy,
            "seconds": round(last.seconds, 3),
            "images_per_second": round(last.images_per_second, 2),
        }
    iso = lambda t: None if t is None else t.isoformat(timespec="seconds") + "Z"  # noqa: E731
    heartbeat_age = age_seconds(run.heartbeat_at)
    return {
        "id": run.id,
        "status": run.status.value,
        "epochs_done": done,
        "epochs": RunConfig.from_dict(run.config).epochs,
        "progress": run.progress,
        "latest_epoch": latest,
        "test_accuracy": RunSummary.from_dict(run.summary).test_accuracy,
        "heartbeat_age_s": None if heartbeat_age is None else round(heartbeat_age, 1),
        "worker": run.worker,
        "pid": run.pid,
        "device": run.device,
        "attempts": run.attempts,
        "cancel_requested": run.cancel_requested,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "error": run.error,
    }
