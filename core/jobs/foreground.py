"""A recorded run trained in the calling process, in the foreground of a terminal: `python -m core train`
(without --background), `resume` and `train-distributed`.

The process owns the run as a background worker would (it claims it in the queue under a name of its
own, so no worker takes it too), draws each stage's progress as a bar on stderr, so that stdout stays
for what a script reads, and says each run's outcome there. Under torchrun, every process trains
the one run and rank 0 records it.

torch is imported only when a run is trained, so that importing this module (the command line's
--help) stays quick.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import sys

from sqlalchemy.orm import sessionmaker
from tqdm import tqdm

from core.config import Settings
from core.errors import UserError
from core.store.records import RunSummary
from core.store.runs import get_run
from core.training.run_config import RunConfig


class Bars:
    """tqdm bars keyed by stage name, drawn on stderr so stdout stays parseable."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="it", file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def owner_name() -> str:
    """The name this process claims runs under in the queue, as a worker's is: where and which process."""
    return f"cli:{socket.gethostname()}:{os.getpid()}"


def train_here(Session: sessionmaker, settings: Settings, run_id: int, claimed: bool = False, group=None) -> None:
    """Train a run in this process, owning it like a worker would (so no worker takes it too)."""
    from core.jobs import execute, queue

    if not claimed and queue.claim_next(Session, owner_name(), run_id) is None:
        print(f"run {run_id}: taken by a background worker; not training it here", file=sys.stderr)
        return
    bars = Bars()
    print(f"run {run_id}: training", file=sys.stderr)
    try:
        execute.execute_run(Session, settings, run_id, progress=bars, group=group)
    finally:
        bars.close()
    with Session() as s:
        run = get_run(s, run_id)
        accuracy = RunSummary.from_dict(run.summary).test_accuracy
        print(f"run {run_id}: {run.status.value}, test accuracy {accuracy}", file=sys.stderr)


def resume_here(Session: sessionmaker, settings: Settings, run_id: int) -> None:
    """Continue a failed or cancelled run from its last finished epoch in this process."""
    from core.jobs import queue

    # Import torch before claiming the run, not after: the claim's heartbeat must not go stale
    # while the training code loads, or a worker would take the run over.
    importlib.import_module("core.jobs.execute")
    with Session.begin() as s:
        queue.reopen(s, settings, run_id, worker=owner_name())
    train_here(Session, settings, run_id, claimed=True)


def _stopped_by_torchrun(signum, frame) -> None:
    # torchrun stops the other processes with SIGTERM when one fails; raising here lets rank 0
    # record the run as failed instead of leaving it "running" until its heartbeat goes stale.
    # Not while an error is already being handled: that handler is recording the failure.
    if sys.exc_info()[1] is None:
        raise RuntimeError("stopped by torchrun: another process of this run ended (see torchrun's output)")


def train_distributed(Session: sessionmaker, settings: Settings, run_id: int) -> int | None:
    """Train one queued run with every process torchrun started (alone: as `train_here` would).

    Returns None in the processes other than rank 0, which record nothing; in rank 0 (or alone), the
    exit status its command should end with: 1 under torchrun when the run did not succeed, so that
    torchrun ends the other processes, which may be waiting for this one; else 0.
    """
    from core.jobs import queue

    with Session() as s:
        run = queue.get_run(s, run_id)
        status, config = run.status.value, RunConfig.from_dict(run.config)
    # Checked before the processes meet, so that none can have claimed the run yet.
    if status != "queued":
        raise UserError(
            f"Run {run_id} is {status}; only a queued run can be trained here (queue one with "
            "`train --background --no-worker`, or reopen this one with `resume --background --no-worker`)."
        )
    from core.jobs import execute
    from core.training import distributed

    with distributed.started(config.device) as group:
        if group is not None and not group.is_main:
            execute.execute_run(Session, settings, run_id, group=group)
            return None
        if group is not None:
            signal.signal(signal.SIGTERM, _stopped_by_torchrun)
        train_here(Session, settings, run_id, group=group)
    with Session() as s:
        status = get_run(s, run_id).status.value
    return 1 if group is not None and status != "succeeded" else 0
