"""The training worker's state (the sidebar, Home, the Train page's queue) and the notice of runs that
failed since a user last looked."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.jobs import worker
from core.jobs.views.formatting import duration_text, failure_message
from core.jobs.views.runs import rows_of, runs_query
from core.store.db import FailuresSeen, Run, RunStatus, utcnow


@dataclass(frozen=True)
class WorkerRow:
    id: str
    device: str | None  # as its last run reported; None before its first
    heartbeat_age: float  # seconds
    running: tuple[int, ...]  # the runs it trains now (the runs table's record: claimed by it, running)
    host: str | None = None
    pid: int | None = None


@dataclass(frozen=True)
class TrainingNow:
    """A run that is running, as the runs table records it (the queue's own record)."""

    run_id: int
    started_at: datetime | None
    owner: str | None  # the worker (host:pid) or command-line process that claimed it


@dataclass(frozen=True)
class WorkerPanel:
    alive: bool
    queued: int
    workers: tuple[WorkerRow, ...]
    running: tuple[TrainingNow, ...] = ()  # every run running, whoever trains it

    @property
    def busy(self) -> bool:
        """Runs wait or train: the panel is worth refreshing."""
        return bool(self.queued or self.running)

    def state(self, now: datetime | None = None) -> str:
        """What training is doing, in a few words: 'running run 3 (started 3 min ago)',
        'waiting for runs' or 'not running'."""
        now = now or utcnow()
        if self.running:
            return "running " + ", ".join(
                f"run {r.run_id}"
                + (f" (started {duration_text((now - r.started_at).total_seconds())} ago)" if r.started_at else "")
                for r in self.running
            )
        return "waiting for runs" if self.alive else "not running"

    def details(self) -> str:
        """The processes behind `state`, for a tooltip: each worker's host, pid, device and heartbeat."""
        lines = [
            f"Worker on {w.host or w.id} (process {w.pid or '?'}), {w.device or 'device reported with its first run'}, "
            f"heartbeat {w.heartbeat_age:.0f} s ago"
            for w in self.workers
        ]
        owned = {r for w in self.workers for r in w.running}
        lines += [
            f"Run {r.run_id} is held by {r.owner or 'a process'}, not a live worker: a run started from the "
            "command line, or one whose worker stopped (the queue takes it back once its heartbeat is stale)"
            for r in self.running
            if r.run_id not in owned
        ]
        return "\n\n".join(lines) or "No worker process is alive; the app starts one when a page loads."


def worker_panel(session: Session, settings: Settings) -> WorkerPanel:
    """Live workers, the runs running and how many wait: the sidebar and Home. What runs is read
    from the runs table, the record the queue itself keeps (a worker's own list of runs lags until
    its next heartbeat), so the sidebar and the Train page's queue always agree."""
    status = worker.worker_status(session, settings)
    running = tuple(
        TrainingNow(run_id, started, owner)
        for run_id, started, owner in session.execute(
            select(Run.id, Run.started_at, Run.worker).where(Run.status == RunStatus.running).order_by(Run.id)
        )
    )
    workers = tuple(
        WorkerRow(
            w["id"],
            w["device"],
            w["heartbeat_age"],
            tuple(r.run_id for r in running if r.owner == w["id"]),
            w["host"],
            w["pid"],
        )
        for w in status["workers"]
    )
    return WorkerPanel(bool(status["alive"]), int(status["queued"]), workers, running)


# ---------------------------------------------------------------------------------------------
# Failures the user has not seen yet

NOTICE_HOURS = 24  # a user who has never dismissed a failure is told of those of the last day


@dataclass(frozen=True)
class FailureNotice:
    run_id: int
    title: str  # RunRow.title
    finished_at: datetime
    message: str  # failure_message


def failure_notices(session: Session, user: str) -> tuple[FailureNotice, ...]:
    """Runs that failed since `user` last dismissed the failures (manage.mark_failures_seen), newest
    first: the sidebar's and the Runs page's notice."""
    seen = session.scalar(select(FailuresSeen.seen_until).where(FailuresSeen.user == user))
    since = seen or utcnow() - timedelta(hours=NOTICE_HOURS)
    found = session.execute(runs_query(Run.status == RunStatus.failed, Run.finished_at > since)).tuples().all()
    rows = rows_of(session, found)
    notices = [
        FailureNotice(
            row.id, row.title, run.finished_at, failure_message(run.error, row.summary) or "No error was recorded."
        )
        for row, (run, _) in zip(rows, found)
    ]
    return tuple(sorted(notices, key=lambda n: n.finished_at, reverse=True))
