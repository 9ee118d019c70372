"""The worker's child processes, each a fresh interpreter started by core/jobs/worker.py:

    python -m core _run RUN_ID --parent PID     train one claimed run (core/jobs/execute.py)
    python -m core _slide JOB_ID --parent PID   classify one claimed whole slide (core/jobs/slide_jobs.py)

Each stops when its worker is gone, so that the next worker can take the run or the slide back.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from core.config import Settings
from core.store.engine import make_sessionmaker

log = logging.getLogger(__name__)


def _watch_parent(parent: int) -> None:
    # Reparented means the worker is gone (killed with SIGKILL, say). Working on would race
    # the next worker, which will take this run or slide again, so stop now.
    while os.getppid() == parent:
        time.sleep(0.25)
    log.error("process %d: its worker (pid %d) is gone; stopping", os.getpid(), parent)
    logging.shutdown()
    os._exit(4)


def _start(parent: int | None) -> None:
    # Ctrl-C in the worker's terminal reaches the whole process group; the worker decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        # The worker's pid is passed in rather than read here: it may have died already.
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-worker", daemon=True).start()


def run_child(settings: Settings, run_id: int, parent: int | None = None) -> None:
    """Train one claimed run, resuming from its last checkpoint if it has one. Stops if process
    `parent` goes away."""
    _start(parent)
    from core.jobs.execute import execute_run  # torch: only the child pays for importing it

    execute_run(make_sessionmaker(settings.database_url), settings, run_id, resume=True)


def run_slide_child(settings: Settings, job_id: int, parent: int | None = None) -> None:
    """Classify one claimed slide. Stops if process `parent` goes away."""
    _start(parent)
    from core.jobs.slide_jobs import execute_slide_job

    execute_slide_job(make_sessionmaker(settings.database_url), settings, job_id)
