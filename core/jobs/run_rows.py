"""A run's row through its life, for core/jobs/execute.py: claimed for this process, running,
finished (retried while the database refuses), with the end of its log and its mean speed.

Each function opens its own short session: none is held across training.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from core.errors import UserError
from core.jobs.queue import claim_next, log_tail
from core.store.db import EpochMetric, Prediction, Run, RunStatus, utcnow
from core.store.records import RunSummary
from core.store.runs import get_run

log = logging.getLogger(__name__)


def mean_speed(session, run_id: int) -> float | None:
    """Training images per second over the run's epochs (the first includes compilation), to 4
    significant figures: a CPU run at 64 px trains well under one image a second."""
    speeds = session.scalars(select(EpochMetric.images_per_second).where(EpochMetric.run_id == run_id)).all()
    return float(f"{sum(speeds) / len(speeds):.4g}") if speeds else None


def claim_if_queued(Session: sessionmaker, run_id: int) -> None:
    """Take a queued run for this process, as a worker would, so that no worker starts it too.
    A run already running was claimed by whoever started this (a worker, the CLI)."""
    with Session() as s:
        status = get_run(s, run_id).status
    if (
        status == RunStatus.queued
        and claim_next(Session, f"process:{socket.gethostname()}:{os.getpid()}", run_id) is None
    ):
        raise UserError(f"Run {run_id} was just taken by a background worker; it trains there.")


def mark_running(Session: sessionmaker, run_id: int, device: str, checkpoint: dict[str, Any] | None) -> None:
    """The run is running on `device` (its description): from scratch, or after `checkpoint`'s epoch."""
    with Session.begin() as s:
        run = get_run(s, run_id)
        run.status, run.error, run.finished_at = RunStatus.running, None, None
        run.device, run.heartbeat_at, run.pid = device, utcnow(), os.getpid()
        if checkpoint is None:
            run.started_at, run.summary = utcnow(), RunSummary().to_dict()
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id))
        else:
            run.started_at = run.started_at or utcnow()
            run.summary = RunSummary.from_dict(run.summary).replace(error_page=None).to_dict()
            # Epochs after the checkpoint were recorded but not checkpointed; they are redone.
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id, EpochMetric.epoch > checkpoint["epoch"]))
        s.execute(delete(Prediction).where(Prediction.run_id == run_id))


# Seconds between attempts to record how a run ended while the database refuses the write (locked
# beyond its busy timeout, or its disk full, which may be why the run is ending).
FINISH_RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0)


def finish(
    Session: sessionmaker,
    run_id: int,
    status: RunStatus,
    timings: dict[str, float],
    error: str | None = None,
    error_page: str | None = None,
) -> None:
    """Record how the run ended (a failure's error also in the pages' words, where they differ),
    trying again while the database refuses. If it never accepts, the
    run stays `running` without a heartbeat: the worker that started this process records the
    failure when it exits, or else the stale-run sweep takes the run back."""
    for delay in (*FINISH_RETRY_SECONDS, None):
        try:
            with Session.begin() as s:
                run = s.get(Run, run_id)
                if run is not None:  # None: the run id was wrong to begin with (or it was deleted)
                    run.status, run.finished_at, run.timings, run.error = status, utcnow(), timings, error
                    run.summary = RunSummary.from_dict(run.summary).replace(error_page=error_page).to_dict()
            return
        except OperationalError:
            if delay is None:
                log.exception("run %d: could not record that it %s", run_id, status.value)
                return
            log.warning(
                "run %d: the database refused to record that it %s; trying again in %g s",
                run_id,
                status.value,
                delay,
                exc_info=True,
            )
            time.sleep(delay)


def store_log_tail(Session: sessionmaker, run_id: int, directory: Path) -> None:
    """The end of train.log on the run's row, for the Runs page; left out if the database refuses."""
    try:
        with Session.begin() as s:
            run = s.get(Run, run_id)
            if run is not None:
                run.log_tail = log_tail(directory / "train.log")
    except OperationalError:
        log.warning("run %d: could not store the end of its log", run_id, exc_info=True)
