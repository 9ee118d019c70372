"""What a running run writes as it goes, besides its results: the heartbeat and cancel watch
(Monitor), and the training callback (Recorder) that records each epoch and checkpoints it.

Each finished epoch is written to the database and then checkpointed, so after a crash the run
continues from the last checkpoint and the database never lacks an epoch the checkpoint has:
last.pt holds everything resuming needs (weights, optimiser moments, random streams, the shuffling
order); the best epoch's weights are kept apart, weights only, in best-epoch.safetensors, for the
model file written when the run succeeds (core/inference/model_file.py).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import delete, select, update
from sqlalchemy.orm import sessionmaker

from core.inference.model_file import write_weights
from core.store.db import EpochMetric, Run, utcnow
from core.store.files import atomic_path
from core.store.records import RunProgress, RunSummary
from core.transforms.pipelines import Progress

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"  # resumable: weights, optimiser, random streams, epoch
BEST_WEIGHTS = "best-epoch.safetensors"  # the best epoch's weights only


class Cancelled(Exception):
    """Someone asked the run to stop (cancel_requested); raised between steps of data preparation."""


class TakenOver(Exception):
    """Another process now owns the run (a worker judged this one dead and restarted the run)."""


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file, then rename: no reader ever sees half a checkpoint."""
    # Through a file object: torch.save names the archive after a path's stem, and the temporary
    # file's stem is empty.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class Monitor:
    """A thread that keeps a running run's heartbeat fresh and notices a cancel request.

    It also publishes the data-preparation progress (decode, augment), which the main thread
    only notes in memory, so that phase costs no database writes of its own. If another process
    has taken the run over (a worker judged this one dead and started it again), training here
    stops at the next step rather than train the same run twice.
    """

    def __init__(self, Session: sessionmaker, run_id: int, every: float):
        self.Session, self.run_id, self.every = Session, run_id, every
        self.cancel = threading.Event()
        self.lost = threading.Event()  # taken over
        self._stage: dict[str, Any] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-run-{run_id}", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped.set()
        self._thread.join()

    def stage(self, name: str, done: int, total: int) -> None:
        """Note progress of a preparation stage; raises Cancelled when a cancel was requested."""
        self._stage = RunProgress(stage=name, done=done, total=total).to_dict()
        self.check(name)

    def check(self, where: str) -> None:
        if self.lost.is_set():
            raise TakenOver(f"run {self.run_id} was taken over by another process during {where}")
        if self.cancel.is_set():
            raise Cancelled(f"run {self.run_id} cancelled during {where}")

    def _loop(self) -> None:
        while not self._stopped.wait(self.every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat must not end the run; the next one retries
                log.warning("run %d: heartbeat failed", self.run_id, exc_info=True)

    def beat(self) -> None:
        stage, self._stage = self._stage, None
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if stage is not None:
            values["progress"] = stage
        with self.Session.begin() as s:
            s.execute(update(Run).where(Run.id == self.run_id).values(**values))
            cancel, pid = s.execute(select(Run.cancel_requested, Run.pid).where(Run.id == self.run_id)).one()
        if cancel:
            self.cancel.set()
        if pid != os.getpid() and not self.lost.is_set():
            log.error(
                "run %d was taken over by another process (pid %s); this one (pid %d) stops.",
                self.run_id,
                pid,
                os.getpid(),
            )
            self.lost.set()


class StepClock:
    """Seconds per training step, now and over the epoch so far. "Now" is the last STEP_WINDOW
    seconds of steps (at least two steps), so when other work slows the machine the time left
    follows within seconds, not at the next epoch."""

    STEP_WINDOW = 20.0

    def __init__(self) -> None:
        self.times: deque[float] = deque()  # when each recent step ended
        self.epoch_start: float | None = None
        self.epoch_steps = 0

    def tick(self, now: float, step: int) -> None:
        if step == 1:  # a new epoch: the time before its first step (validation, loading) is not a step's
            self.times.clear()
            self.epoch_start, self.epoch_steps = now, 0
        else:
            self.epoch_steps += 1
        self.times.append(now)
        while len(self.times) > 2 and now - self.times[1] >= self.STEP_WINDOW:
            self.times.popleft()

    def recent(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def epoch_mean(self) -> float | None:
        if not self.epoch_steps or self.epoch_start is None or not self.times:
            return None
        return (self.times[-1] - self.epoch_start) / self.epoch_steps


class Recorder:
    """Training callback: epoch metrics and progress to the database, checkpoints to disk."""

    def __init__(
        self,
        Session: sessionmaker,
        run_id: int,
        directory: Path,
        progress: Progress | None,
        extra: dict[str, Any],
        epochs: int,
        monitor: Monitor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.Session, self.run_id, self.dir, self.progress = Session, run_id, directory, progress
        self.extra = extra  # stored in each checkpoint: which run it belongs to
        self.epochs = epochs
        self.monitor = monitor
        self.clock = clock
        self.steps = StepClock()
        self._last_write = -math.inf
        self._stop = False

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        if self.progress:
            self.progress(f"epoch {epoch}", step, steps)
        now = self.clock()
        self.steps.tick(now, step)
        if now - self._last_write >= 1.0 or step == steps:  # at most once a second
            self._last_write = now
            with self.Session.begin() as s:
                run = s.get(Run, self.run_id)
                run.progress = RunProgress(
                    stage="train",
                    epoch=epoch,
                    epochs=self.epochs,
                    step=step,
                    steps=steps,
                    step_seconds=self.steps.recent(),
                    epoch_step_seconds=self.steps.epoch_mean(),
                ).to_dict()
                run.heartbeat_at = utcnow()
                self._stop = run.cancel_requested

    def on_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: dict[str, Any], is_best: bool) -> None:
        # Database first, checkpoint second: a crash in between leaves an epoch recorded but not
        # checkpointed, which the resumed run simply redoes (replacing the row with equal values).
        # The other order would leave a checkpoint for an epoch the database has never seen.
        with self.Session.begin() as s:
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == self.run_id, EpochMetric.epoch == epoch))
            s.add(
                EpochMetric(
                    run_id=self.run_id,
                    epoch=epoch,
                    train_loss=metrics["train_loss"],
                    train_accuracy=metrics["train_accuracy"],
                    val_loss=metrics.get("val_loss"),
                    val_accuracy=metrics.get("val_accuracy"),
                    seconds=metrics["seconds"],
                    images_per_second=metrics["images_per_second"],
                )
            )
            run = s.get(Run, self.run_id)
            if is_best:
                run.summary = RunSummary.from_dict(run.summary).replace(best_epoch=epoch).to_dict()
        # The best weights before the checkpoint that counts on them: a resume point never names a
        # best epoch whose weights are not on disk.
        if is_best:
            write_weights(self.dir / BEST_WEIGHTS, checkpoint["model"])
        save_atomic({**checkpoint, **self.extra}, self.dir / CHECKPOINT)
        log.info("run %d epoch %d: %s", self.run_id, epoch, {k: round(v, 4) for k, v in metrics.items()})

    def should_stop(self) -> bool:
        monitor = self.monitor
        return self._stop or (monitor is not None and (monitor.cancel.is_set() or monitor.lost.is_set()))
