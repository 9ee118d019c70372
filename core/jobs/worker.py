"""The background worker: `python -m core worker` trains queued runs, each in a child process.

A worker loops: heartbeat, sweep, reap, claim.
  heartbeat  stamp its row in `workers` and the rows of the runs it is training (the child also
             stamps its run, from a thread, so a long decode or augment phase looks alive);
  sweep      requeue runs whose heartbeat went stale (their worker died), to be resumed from
             their last finished epoch;
  reap       record how each finished child ended (a child that dies without recording a result,
             killed for memory say, fails its run with the exit code and the end of its output);
  claim      take queued runs, oldest first, up to settings.worker_slots at once, and start
             `python -m core _run RUN_ID` for each; with no run waiting, take queued whole slides
             to classify (core/jobs/slide_jobs.py) and start `python -m core _slide JOB_ID`.

The child (core/jobs/children.py) is a fresh interpreter, not a fork, so CUDA, threads and open
database connections of the worker never leak into training. A child stops when its worker dies (it watches its parent),
so that a run is never trained twice and the sweep can hand it to the next worker. On SIGTERM or
Ctrl-C the worker stops its children and requeues their runs before it exits.

The web app calls `ensure_worker(settings)` on each page load: it starts a detached worker when no
worker has a fresh heartbeat. Training then survives the browser, the web server and, through the
sweep, the worker itself.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings, child_env
from core.jobs import queue, slide_jobs
from core.store.db import Run, RunStatus, SlideJob, Worker, utcnow
from core.store.engine import make_sessionmaker

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the checkout, where `python -m core` works
POLL_SECONDS = 0.5  # how often an idle worker looks for queued runs (a read, no lock)
# A worker started by the app leaves after this long with nothing queued or running anywhere;
# the app starts another on its next page load (or `train --background` does). No stray
# processes pile up, e.g. from test runs.
AUTOSTART_IDLE_EXIT_SECONDS = 900
CANCEL_GRACE_SECONDS = 60  # a run that ignores a cancel this long (stuck in C code) is terminated
STOP_GRACE_SECONDS = 10  # after SIGTERM, how long a child has before SIGKILL


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _child_env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, **child_env(settings)}  # every setting, so the child sees these same settings
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------------------------------------
# For the web pages (and `train --background`)

_sessionmakers: dict[str, sessionmaker] = {}


def _sessionmaker(url: str) -> sessionmaker:
    # One engine per database per process: pages call ensure_worker on every load.
    if url not in _sessionmakers:
        _sessionmakers[url] = make_sessionmaker(url)
    return _sessionmakers[url]


def _fresh_workers(session: Session, settings: Settings) -> list[Worker]:
    now = utcnow()
    return [
        w
        for w in session.scalars(select(Worker).order_by(Worker.started_at))
        if queue.age_seconds(w.heartbeat_at, now) <= settings.stale_seconds and not _exited_here(w)
    ]


def _exited_here(worker: Worker) -> bool:
    """A worker of this machine whose process is gone (or a zombie) though its heartbeat still looks
    fresh: without this, `train --background` right after a worker died would queue runs that wait
    until the heartbeat goes stale. A worker on another machine is judged by its heartbeat alone."""
    if worker.host != socket.gethostname() or not Path("/proc").is_dir():
        return False
    try:
        command = Path(f"/proc/{worker.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True
    return b"worker" not in command  # a zombie has no command line; a reused pid is another program


def ensure_worker(settings: Settings) -> bool:
    """Start a detached background worker unless one has a fresh heartbeat; True if one was started.

    The new worker runs in its own session (it outlives the caller), logging to APP_HOME/worker.log.
    With START_WORKER=0 (workers run elsewhere) it never starts one.
    """
    if not settings.start_worker:
        return False
    Session = _sessionmaker(settings.database_url)
    settings.app_home.mkdir(parents=True, exist_ok=True)
    # The lock makes check-and-start one step, so two page loads at once start one worker, not two.
    with open(settings.app_home / "worker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with Session() as s:
            if _fresh_workers(s, settings):
                return False
        with open(settings.app_home / "worker.log", "ab") as output:
            command = [sys.executable, "-m", "core", "worker", "--idle-exit", str(AUTOSTART_IDLE_EXIT_SECONDS)]
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=_child_env(settings),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Its row is written now, not when the interpreter has started, so that a second call
        # within that second sees a live worker.
        with Session.begin() as s:
            s.merge(
                Worker(
                    id=f"{socket.gethostname()}:{process.pid}",
                    host=socket.gethostname(),
                    pid=process.pid,
                    heartbeat_at=utcnow(),
                    slots=settings.worker_slots,
                    run_ids=[],
                )
            )
    log.info("started background worker pid %d (log: %s)", process.pid, settings.app_home / "worker.log")
    return True


def worker_status(session: Session, settings: Settings) -> dict[str, Any]:
    """For the pages: is a worker alive, what is each live worker doing, how many runs wait.

    {"alive": bool, "queued": int, "workers": [{"id", "heartbeat_age" (s), "running" (run ids),
    "device", "host", "pid", "slots"}]}
    """
    now = utcnow()
    workers = [
        {
            "id": w.id,
            "heartbeat_age": round(queue.age_seconds(w.heartbeat_at, now), 1),
            "running": list(w.run_ids),
            "device": w.device,
            "host": w.host,
            "pid": w.pid,
            "slots": w.slots,
        }
        for w in _fresh_workers(session, settings)
    ]
    queued = session.scalar(select(func.count()).select_from(Run).where(Run.status == RunStatus.queued))
    return {"alive": bool(workers), "workers": workers, "queued": queued}


# ---------------------------------------------------------------------------------------------
# The worker process


@dataclass
class Child:
    run_id: int
    process: subprocess.Popen
    output: IO[bytes]
    cancel_seen_at: float | None = None


@dataclass
class WorkerLoop:
    Session: sessionmaker
    settings: Settings
    once: bool = False  # exit when nothing is queued and nothing is running here
    max_runs: int | None = None  # exit after starting this many runs (and seeing them end)
    slots: int = 1
    idle_exit: float | None = None  # exit after this many seconds with no run queued or running anywhere
    id: str = field(default_factory=worker_id)
    children: dict[int, Child] = field(default_factory=dict)
    slides: dict[int, Child] = field(default_factory=dict)  # slide job id -> its process
    started: int = 0
    stopping: bool = False
    busy_at: float = field(default_factory=time.monotonic)

    def run(self) -> int:
        """Work until told to stop (or, with once/max_runs, until done); returns runs started."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._stop)
            signal.signal(signal.SIGINT, self._stop)
        log.info(
            "worker %s: %d slot(s), heartbeat %gs, stale after %gs, database %s",
            self.id,
            self.slots,
            self.settings.heartbeat_seconds,
            self.settings.stale_seconds,
            self.settings.database_url,
        )
        next_beat = 0.0
        try:
            while not self.stopping:
                try:
                    if time.monotonic() >= next_beat:
                        self.beat()
                        self.sweep()
                        next_beat = time.monotonic() + self.settings.heartbeat_seconds
                    self.reap()
                    self.fill_slots()
                except (OperationalError, OSError):
                    # The database was unavailable (locked beyond the busy timeout, a server
                    # restarting, its disk full) or a file could not be written: the children
                    # train on regardless; try again shortly.
                    log.warning("worker %s: database or file error; retrying", self.id, exc_info=True)
                if not self.children and not self.slides and (self.once or self._quota_used()):
                    break
                if self.idle_exit is not None and time.monotonic() - self.busy_at > self.idle_exit:
                    log.info("worker %s: idle for %gs; exiting", self.id, self.idle_exit)
                    break
                time.sleep(POLL_SECONDS)
        finally:
            self.shutdown()
        return self.started

    def _stop(self, signum: int, _frame: Any) -> None:
        log.info("worker %s: %s received; stopping", self.id, signal.Signals(signum).name)
        self.stopping = True

    def _quota_used(self) -> bool:
        return self.max_runs is not None and self.started >= self.max_runs

    # heartbeat ---------------------------------------------------------------------------------

    def beat(self) -> None:
        now = utcnow()
        with self.Session.begin() as s:
            me = s.get(Worker, self.id)
            if me is None:  # first beat (or a sweep elsewhere took this worker for dead)
                me = Worker(id=self.id, host=socket.gethostname(), pid=os.getpid(), started_at=now)
                s.add(me)
            me.heartbeat_at, me.slots, me.run_ids = now, self.slots, sorted(self.children)
            for child in self.children.values():
                directory = self.settings.runs_dir / str(child.run_id)
                s.execute(
                    update(Run)
                    .where(Run.id == child.run_id, Run.worker == self.id, Run.status == RunStatus.running)
                    .values(heartbeat_at=now, log_tail=queue.log_tail(directory / "train.log"))
                )
            running = (
                s.execute(select(Run.id, Run.cancel_requested, Run.device).where(Run.id.in_(list(self.children)))).all()
                if self.children
                else []
            )
            for run_id, cancel, device in running:
                if device:
                    me.device = device
                if cancel:
                    self._enforce_cancel(self.children[run_id])
            if self.slides:  # tiling a large slide reports no progress for a while: alive all the same
                s.execute(
                    update(SlideJob)
                    .where(
                        SlideJob.id.in_(list(self.slides)),
                        SlideJob.worker == self.id,
                        SlideJob.status == RunStatus.running,
                    )
                    .values(heartbeat_at=now)
                )
            # Busy includes runs of other (perhaps dead) workers: staying keeps the sweep going.
            active = select(Run.id).where(Run.status.in_([RunStatus.queued, RunStatus.running])).limit(1)
            slides = select(SlideJob.id).where(SlideJob.status.in_([RunStatus.queued, RunStatus.running])).limit(1)
            if self.children or self.slides or s.scalar(active) is not None or s.scalar(slides) is not None:
                self.busy_at = time.monotonic()

    def _enforce_cancel(self, child: Child) -> None:
        # Cancelling is cooperative (the run checks its flag between steps); this is the backstop
        # for a run stuck where it cannot check.
        child.cancel_seen_at = child.cancel_seen_at or time.monotonic()
        if time.monotonic() - child.cancel_seen_at > CANCEL_GRACE_SECONDS and child.process.poll() is None:
            log.warning(
                "worker %s: run %d ignored its cancel for %ds; terminating it",
                self.id,
                child.run_id,
                CANCEL_GRACE_SECONDS,
            )
            child.process.terminate()

    def sweep(self) -> None:
        with self.Session.begin() as s:
            done = queue.requeue_stale(s, self.settings)
            stale_slides = slide_jobs.requeue_stale_slides(s, self.settings)
            now = utcnow()
            dead = [
                w.id
                for w in s.scalars(select(Worker).where(Worker.id != self.id))
                if queue.age_seconds(w.heartbeat_at, now) > self.settings.stale_seconds
            ]
            if dead:
                s.execute(delete(Worker).where(Worker.id.in_(dead)))
        if stale_slides:
            log.warning("worker %s: stale slide job(s) %s requeued", self.id, stale_slides)
        for outcome, run_ids in done.items():
            if run_ids:
                log.warning("worker %s: stale run(s) %s %s", self.id, run_ids, outcome)

    # children ----------------------------------------------------------------------------------

    def fill_slots(self) -> None:
        while len(self.children) + len(self.slides) < self.slots and not self._quota_used() and not self.stopping:
            with self.Session() as s:
                runs, slides = queue.has_queued(s), slide_jobs.has_queued_slide(s)
            if runs:
                run_id = queue.claim_next(self.Session, self.id)
                if run_id is not None:
                    self.start(run_id)
            elif slides:
                job_id = slide_jobs.claim_next_slide(self.Session, self.id)
                if job_id is not None:
                    self.start_slide(job_id)
            else:
                return
            # None: another worker took it; look again

    def start_slide(self, job_id: int) -> None:
        folder = self.settings.slide_jobs_dir / str(job_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            output = open(folder / "process.log", "ab")
            command = [sys.executable, "-m", "core", "_slide", str(job_id), "--parent", str(os.getpid())]
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=_child_env(self.settings),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            slide_jobs.record_exit(self.Session, self.settings, job_id, self.id, 1, f"It could not start: {exc}")
            return
        self.slides[job_id] = Child(job_id, process, output)
        log.info("worker %s: slide job %d started, pid %d", self.id, job_id, process.pid)

    def start(self, run_id: int) -> None:
        directory = self.settings.runs_dir / str(run_id)
        try:  # a full disk refuses even the run's folder and logs
            directory.mkdir(parents=True, exist_ok=True)
            queue.note(self.settings, run_id, f"started by worker {self.id}")
            output = open(directory / "process.log", "ab")
        except OSError as exc:
            log.error("worker %s: run %d: cannot write its folder (%s)", self.id, run_id, exc)
            self._fail(run_id, queue.failure_text(exc, run_id))
            return
        try:
            command = [sys.executable, "-m", "core", "_run", str(run_id), "--parent", str(os.getpid())]
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=_child_env(self.settings),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            output.close()
            self._fail(run_id, f"Could not start the training process: {exc}")
            return
        self.children[run_id] = Child(run_id, process, output)
        self.started += 1
        with self.Session.begin() as s:
            s.execute(update(Run).where(Run.id == run_id, Run.worker == self.id).values(pid=process.pid))
        log.info("worker %s: run %d started, pid %d", self.id, run_id, process.pid)

    def _fail(self, run_id: int, error: str) -> None:
        with self.Session.begin() as s:
            s.execute(
                update(Run).where(Run.id == run_id).values(status=RunStatus.failed, finished_at=utcnow(), error=error)
            )

    def reap(self) -> None:
        for job_id, child in list(self.slides.items()):
            code = child.process.poll()
            if code is None:
                continue
            child.output.close()
            tail = queue.log_tail(self.settings.slide_jobs_dir / str(job_id) / "process.log", 15) or ""
            slide_jobs.record_exit(self.Session, self.settings, job_id, self.id, code, f"Its last output:\n{tail}")
            del self.slides[job_id]
        for run_id, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            child.output.close()
            # Recorded before it is forgotten: if the database refuses now, the next round retries.
            self._record_exit(run_id, code)
            del self.children[run_id]

    def _record_exit(self, run_id: int, code: int) -> None:
        directory = self.settings.runs_dir / str(run_id)
        with self.Session.begin() as s:
            run = s.get(Run, run_id)
            if run is None:  # deleted while it trained
                return
            run.log_tail = queue.log_tail(directory / "train.log")
            if run.status == RunStatus.running and run.worker == self.id:
                # The child ended without recording a result: it was killed or crashed hard.
                run.finished_at = utcnow()
                if run.cancel_requested:
                    run.status = RunStatus.cancelled
                else:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    output = queue.log_tail(directory / "process.log", 15) or ""
                    run.status = RunStatus.failed
                    run.error = (
                        f"The training process {how} without recording a result "
                        f"(out of memory?). Its last output:\n{output}"
                    ).strip()
            status = run.status
        log.info("worker %s: run %d ended %s (exit code %d)", self.id, run_id, status.value, code)

    def shutdown(self) -> None:
        """Stop the children and put their runs back in the queue, to resume from their last epoch
        (and their slides, to start again)."""
        every = [*self.slides.values(), *self.children.values()]
        for child in every:  # all told at once, then each waited for
            if child.process.poll() is None:
                child.process.terminate()
        for child in every:
            try:
                child.process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            child.output.close()
        for job_id in self.slides:
            slide_jobs.requeue_on_stop(self.Session, job_id, self.id)
        self.slides.clear()
        for run_id in self.children:
            with self.Session.begin() as s:
                cancelled = s.execute(
                    update(Run)
                    .where(
                        Run.id == run_id,
                        Run.worker == self.id,
                        Run.status == RunStatus.running,
                        Run.cancel_requested,
                    )
                    .values(status=RunStatus.cancelled, finished_at=utcnow())
                ).rowcount
                # The worker stopping is not the run's fault: the attempt is given back.
                requeued = s.execute(
                    update(Run)
                    .where(
                        Run.id == run_id,
                        Run.worker == self.id,
                        Run.status == RunStatus.running,
                    )
                    .values(status=RunStatus.queued, worker=None, pid=None, attempts=Run.attempts - 1)
                ).rowcount
            if requeued:
                queue.note(self.settings, run_id, f"requeued: worker {self.id} stopped")
            log.info(
                "worker %s: run %d %s",
                self.id,
                run_id,
                "cancelled" if cancelled else "requeued" if requeued else "ended",
            )
        self.children.clear()
        with self.Session.begin() as s:
            s.execute(delete(Worker).where(Worker.id == self.id))
        log.info("worker %s: stopped after starting %d run(s)", self.id, self.started)


def run_worker(
    settings: Settings,
    *,
    once: bool = False,
    max_runs: int | None = None,
    slots: int | None = None,
    idle_exit: float | None = None,
) -> int:
    """`python -m core worker`: returns the number of runs it started."""
    Session = make_sessionmaker(settings.database_url)
    loop = WorkerLoop(
        Session, settings, once=once, max_runs=max_runs, slots=slots or settings.worker_slots, idle_exit=idle_exit
    )
    return loop.run()
