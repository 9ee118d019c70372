"""Background jobs: the queue, real worker processes, cancel, resume after SIGKILL, concurrent readers.

Workers and their training children are real subprocesses (`python -m core worker`), on the CPU at
32 px with a few images, one thread each (two training processes on two cores, no oversubscription).
Heartbeats every 0.5 s and staleness after 5 s keep the crash test short.

The tests marked BOTH run on SQLite and on PostgreSQL (a fresh database per test, on the server
named by TEST_POSTGRES_URL or on one started for the session; see tests/pg.py).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import OperationalError

from core.access.accounts import LOCAL_USER
from core.config import load_settings
from core.data.ingest import ingest
from core.errors import UserError
from core.jobs import queue, recording, runs
from core.jobs.worker import ensure_worker, worker_status
from core.store import migrations
from core.store.db import Base, Dataset, EpochMetric, Run, RunStatus, Worker, utcnow
from core.store.engine import make_sessionmaker, new_engine
from core.training.run_config import RunConfig
from tests.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
# Small enough for a quick crash test, large enough that a busy test machine (other jobs on the two
# cores) does not delay a heartbeat past it and make a live run look dead.
STALE = "5"
TINY = dict(image_size=32, per_class=4, batch_size=4, lr=1e-3, weights="none", device="cpu", epochs=1, seed=3)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


def _settings(home: Path, **extra: str):
    return load_settings({"APP_HOME": str(home), "HEARTBEAT_SECONDS": "0.5", "STALE_SECONDS": STALE, **extra})


@pytest.fixture
def backend(request) -> str:
    """The database a test runs on: SQLite unless the test is marked BOTH."""
    return getattr(request, "param", "sqlite")


# The queue's claim differs by database (BEGIN IMMEDIATE on SQLite, FOR UPDATE SKIP LOCKED on
# PostgreSQL), so the tests of the queue and its workers run on both.
BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def jset(request, backend, tmp_path, monkeypatch):
    """Settings whose values also reach every process the test starts (through the environment).
    On PostgreSQL, a fresh database of its own (see the postgres_url fixture)."""
    home = tmp_path / "home"
    for key, value in {
        "APP_HOME": str(home),
        "HEARTBEAT_SECONDS": "0.5",
        "STALE_SECONDS": STALE,
        "OMP_NUM_THREADS": "1",
        "WORKER_SLOTS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("DATABASE_URL", url)
        return _settings(home, DATABASE_URL=url)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    return _settings(home)


@pytest.fixture
def JSession(jset):
    return make_sessionmaker(jset.database_url)


@pytest.fixture
def toy(tmp_path, jset, JSession):
    write_dataset(tmp_path / "src", per_class=6)
    with JSession.begin() as s:
        ingest(s, jset, tmp_path / "src", "toy", user=LOCAL_USER)
    return "toy"


@pytest.fixture
def processes(jset, JSession):
    """Worker processes the test starts (each in its own process group, with its children).
    At the end every one still alive, and any worker started by ensure_worker, is killed."""
    started: list[subprocess.Popen] = []
    yield started
    groups = {p.pid for p in started if p.poll() is None}
    with JSession() as s:
        # Only processes that are still workers of this test (a pid can be reused).
        groups |= {w.pid for w in s.scalars(select(Worker)) if _is_worker_of(w.pid, jset.app_home)}
    for pid in groups:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in started:
        p.wait(10)


def _is_worker_of(pid: int, app_home: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in cmdline and f"APP_HOME={app_home}".encode() in environ


def start_worker(processes, home: Path, *args: str) -> subprocess.Popen:
    log = open(home.parent / f"worker-{len(processes)}.log", "wb")
    p = subprocess.Popen(
        [sys.executable, "-m", "core", "worker", *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    processes.append(p)
    return p


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def queue_run(Session, settings, dataset: str, **config) -> int:
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, RunConfig(dataset=dataset, **{**TINY, **config}), user=LOCAL_USER)
        return run.id


def wait_for(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def status_of(Session, run_id: int) -> RunStatus:
    with Session() as s:
        return s.scalar(select(Run.status).where(Run.id == run_id))


def epochs_of(Session, run_id: int) -> list[int]:
    with Session() as s:
        return list(
            s.scalars(select(EpochMetric.epoch).where(EpochMetric.run_id == run_id).order_by(EpochMetric.epoch))
        )


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Reader(threading.Thread):
    """Polls the run and epoch tables as a page would, from its own engine, while jobs write."""

    def __init__(self, settings):
        super().__init__(daemon=True)
        self.settings, self.polls, self.errors = settings, 0, []
        self.stopped = threading.Event()

    def run(self) -> None:
        Session = make_sessionmaker(self.settings.database_url)
        while not self.stopped.is_set():
            try:
                with Session() as s:
                    for run in s.scalars(select(Run)):
                        queue.run_status(s, run.id)
                    worker_status(s, self.settings)
                self.polls += 1
            except OperationalError as exc:  # "database is locked" would land here
                self.errors.append(exc)
            time.sleep(0.2)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.join(10)


# ---------------------------------------------------------------------------------------------
# The queue, without processes


def _bare_runs(Session, n: int) -> list[int]:
    with Session.begin() as s:
        dataset = Dataset(name="bare", classes=["a", "b"])
        s.add(dataset)
        s.flush()
        runs_ = [Run(dataset_id=dataset.id, experiment="x", config={"epochs": 1}, seed=0) for _ in range(n)]
        s.add_all(runs_)
        s.flush()
        return [r.id for r in runs_]


@BOTH
def test_concurrent_claims_take_each_run_once_in_order(jset, JSession):
    run_ids = _bare_runs(JSession, 30)
    claims: dict[str, list[int]] = {}

    def claimer(name: str) -> None:
        Session = make_sessionmaker(jset.database_url)  # its own engine and connections, like a process
        mine = claims.setdefault(name, [])
        while (run_id := queue.claim_next(Session, name)) is not None:
            mine.append(run_id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    taken = sorted(r for mine in claims.values() for r in mine)
    assert taken == run_ids  # every run once: none lost, none twice
    assert all(mine == sorted(mine) for mine in claims.values())  # oldest first
    with JSession() as s:
        for name, mine in claims.items():
            for run in s.scalars(select(Run).where(Run.id.in_(mine))):
                assert (run.status, run.worker, run.attempts) == (RunStatus.running, name, 1)
    assert queue.claim_next(JSession, "late") is None


@BOTH
def test_cancel_resume_and_stale_rules(jset, JSession):
    queued, running, done, stale, stale_cancel, worn_out = _bare_runs(JSession, 6)
    long_ago = utcnow() - timedelta(seconds=60)
    with JSession.begin() as s:
        s.execute(update(Run).where(Run.id == done).values(status=RunStatus.succeeded))
        s.execute(
            update(Run)
            .where(Run.id.in_([running, stale, stale_cancel, worn_out]))
            .values(status=RunStatus.running, heartbeat_at=long_ago, attempts=1)
        )
        s.execute(update(Run).where(Run.id == running).values(heartbeat_at=utcnow()))
        s.execute(update(Run).where(Run.id == stale_cancel).values(cancel_requested=True))
        s.execute(update(Run).where(Run.id == worn_out).values(attempts=queue.MAX_ATTEMPTS))

    with JSession.begin() as s:
        assert queue.request_cancel(s, queued) == RunStatus.cancelled  # at once
        assert queue.request_cancel(s, running) == RunStatus.running  # flagged; the run stops itself
    with JSession.begin() as s, pytest.raises(UserError, match="already ended"):
        queue.request_cancel(s, done)
    with JSession() as s:
        assert s.get(Run, running).cancel_requested and s.get(Run, queued).finished_at is not None

    with JSession.begin() as s:
        outcome = queue.requeue_stale(s, jset)
    assert outcome == {"requeued": [stale], "cancelled": [stale_cancel], "failed": [worn_out]}
    with JSession() as s:
        assert s.get(Run, stale).status == RunStatus.queued and s.get(Run, stale).worker is None
        assert "stopped responding" in s.get(Run, worn_out).error
        assert s.get(Run, running).status == RunStatus.running  # fresh heartbeat: left alone
    assert "requeued" in (jset.runs_dir / str(stale) / "train.log").read_text()

    for run_id, message in [(done, "already succeeded"), (stale, "already queued"), (running, "is running")]:
        with JSession.begin() as s, pytest.raises(UserError, match=message):
            queue.reopen(s, jset, run_id)
    with JSession.begin() as s:
        queue.reopen(s, jset, worn_out)
    with JSession() as s:
        run = s.get(Run, worn_out)
        assert (run.status, run.error, run.attempts) == (RunStatus.queued, None, 0)


@BOTH
def test_a_run_taken_over_by_another_process_stops_here(jset, JSession):
    (run_id,) = _bare_runs(JSession, 1)
    with JSession.begin() as s:
        s.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(status=RunStatus.running, pid=os.getpid(), cancel_requested=False)
        )
    monitor = recording.Monitor(JSession, run_id, every=60)
    monitor.stage("augment", 1, 2)  # noted in memory; still ours, so nothing is raised
    monitor.beat()  # published with the heartbeat
    assert not monitor.lost.is_set()
    with JSession() as s:
        assert s.get(Run, run_id).progress == {"stage": "augment", "done": 1, "total": 2}
    with JSession.begin() as s:  # a worker judged this process dead and restarted the run
        s.execute(update(Run).where(Run.id == run_id).values(pid=os.getpid() + 1, cancel_requested=True))
    monitor.beat()
    assert monitor.lost.is_set() and monitor.cancel.is_set()
    with pytest.raises(recording.TakenOver):
        monitor.stage("augment", 2, 2)


def _upgrade_and_say(url: str, said) -> None:
    said.put(migrations.upgrade(new_engine(url)).said_before())


@BOTH
def test_the_schema_is_made_then_upgraded_in_place(jset):
    """A new database gets every table; one made before migrations and before a column was added
    gets the column, its rows kept (with the column's default), and starting again on an
    up-to-date one changes nothing."""
    Session = make_sessionmaker(jset.database_url)
    engine = queue.engine_of(Session)
    assert {t.name for t in Base.metadata.sorted_tables} <= set(inspect(engine).get_table_names())
    (old,) = _bare_runs(Session, 1)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE runs DROP COLUMN attempts"))
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()

    # Two processes starting on the old database at the same moment (the app and a worker, say,
    # forked so that neither spends a second importing first): one upgrades it, the other waits for
    # the schema lock and finds the work done.
    fork = multiprocessing.get_context("fork")
    said = fork.Queue()
    starters = [fork.Process(target=_upgrade_and_say, args=(jset.database_url, said)) for _ in range(2)]
    for p in starters:
        p.start()
    for p in starters:
        p.join(60)
    assert [p.exitcode for p in starters] == [0, 0]
    head = migrations.head()
    assert sorted(said.get(timeout=5) for _ in starters) == [head, "none (made before migrations)"]
    assert migrations.upgrade(engine).before == head  # and once more, with nothing left to do
    assert "attempts" in {c["name"] for c in inspect(engine).get_columns("runs")}
    with Session() as s:
        assert s.get(Run, old).attempts == 0
    assert queue.claim_next(Session, "w") == old
    with Session() as s:
        assert s.get(Run, old).attempts == 1


def test_processes_starting_together_on_a_new_postgresql_database_share_one_schema(postgres_url):
    """The app and its workers starting at once on an empty database (as compose.yaml starts them)."""
    started, errors = [], []

    def start() -> None:
        try:
            started.append(make_sessionmaker(postgres_url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(started) == 3
    (run_id,) = _bare_runs(started[0], 1)
    assert queue.claim_next(started[1], "w") == run_id and queue.claim_next(started[2], "w") is None


# ---------------------------------------------------------------------------------------------
# Real workers


@pytest.mark.parametrize("command", ["worker", "cancel", "status", "resume", "workers"])
def test_job_commands_have_help(command, capsys):
    from core.__main__ import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m core " + command)


@BOTH
def test_an_idle_worker_reports_itself_and_can_leave(jset, JSession, processes):
    worker = start_worker(processes, jset.app_home, "--idle-exit", "3")
    with JSession() as s:
        wait_for(lambda: worker_status(s, jset)["alive"], 60, "the worker's first heartbeat")
    status = json.loads(cli("workers").stdout)
    assert status["alive"] and status["queued"] == 0
    (me,) = status["workers"]
    assert me["pid"] == worker.pid and me["running"] == [] and me["heartbeat_age"] < 3
    assert worker.wait(30) == 0  # nothing queued or running for 3 s: it leaves, and says so
    with JSession() as s:
        assert worker_status(s, jset) == {"alive": False, "workers": [], "queued": 0}


@BOTH
def test_two_workers_take_five_runs_once_each_and_record_how_they_ended(backend, jset, JSession, toy, processes):
    good = queue_run(JSession, jset, toy, epochs=2)
    bad = queue_run(JSession, jset, toy, lr=1e12)  # the loss becomes non-finite
    # On PostgreSQL three runs, not five, to keep the suite's time: two workers still race for them.
    small = 3 if backend == "sqlite" else 1
    run_ids = [good, bad] + [queue_run(JSession, jset, toy, per_class=2, seed=i) for i in range(small)]
    with Reader(jset) as reader:  # a page polling while two workers and their children write
        workers = [start_worker(processes, jset.app_home, "--once") for _ in range(2)]
        assert [w.wait(300) for w in workers] == [0, 0]
    assert not reader.errors and reader.polls > 10

    # Each run was taken exactly once, by one of the two workers.
    with JSession() as s:
        taken = {r.id: (r.attempts, r.worker) for r in s.scalars(select(Run).where(Run.id.in_(run_ids)))}
    assert all(attempts == 1 for attempts, _ in taken.values())
    assert {w.split(":")[-1] for _, w in taken.values()} <= {str(w.pid) for w in workers}
    for run_id in run_ids:
        log = (jset.runs_dir / str(run_id) / "train.log").read_text()
        assert log.count("started by worker") == 1 and log.count(f"run {run_id}: weights") == 1

    # A fresh engine, as after restarting the web server, sees everything the workers recorded.
    Fresh = make_sessionmaker(jset.database_url)
    with Fresh() as s:
        for run_id in run_ids[2:]:
            assert s.get(Run, run_id).status == RunStatus.succeeded, s.get(Run, run_id).error
        run = s.get(Run, good)
        assert run.status == RunStatus.succeeded, run.error
        assert run.device.startswith("cpu") and run.pid and run.summary["test_accuracy"] is not None
        assert run.started_at <= run.finished_at and run.heartbeat_at is not None
        assert "succeeded" in run.log_tail and len(run.log_tail.splitlines()) <= queue.LOG_TAIL_LINES
        failed = s.get(Run, bad)
        assert failed.status == RunStatus.failed
        assert "loss" in failed.error.lower() and "failed" in failed.log_tail
        assert worker_status(s, jset) == {"alive": False, "workers": [], "queued": 0}
    assert epochs_of(Fresh, good) == [1, 2]

    out = cli("status", str(good))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["status"] == "succeeded" and status["epochs_done"] == 2 and status["latest_epoch"]["epoch"] == 2
    assert status["error"] is None and status["heartbeat_age_s"] >= 0


# On SQLite only: a cancel and a resume write the same rows on either database, and the claims that
# differ (a worker starting, taking a run back) are run on PostgreSQL by the two tests around this one.
def test_cancel_stops_a_running_run_keeping_its_epochs_then_resume_finishes_it(jset, JSession, toy, processes):
    out = cli(
        "train",
        "--dataset",
        toy,
        "--background",
        "--epochs",
        "4",
        "--per-class",
        "6",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--weights",
        "none",
        "--device",
        "cpu",
        "--seed",
        "5",
    )
    assert out.returncode == 0, out.stderr
    run_id = int(out.stdout.strip().splitlines()[-1])
    assert "started a background worker" in out.stderr  # through ensure_worker

    wait_for(lambda: epochs_of(JSession, run_id), 180, "the first epoch")
    with JSession() as s:
        status = worker_status(s, jset)
    assert status["alive"] and status["workers"][0]["running"] == [run_id] and status["queued"] == 0
    assert not ensure_worker(jset)  # one is alive: no second one

    t0 = time.monotonic()
    out = cli("cancel", str(run_id))
    assert out.returncode == 0 and "cancel requested" in out.stdout, out.stderr
    wait_for(lambda: status_of(JSession, run_id) == RunStatus.cancelled, 30, "the run to stop")
    assert time.monotonic() - t0 < 15
    kept = epochs_of(JSession, run_id)
    assert kept == list(range(1, len(kept) + 1)) and len(kept) < 4
    assert json.loads(cli("status", str(run_id)).stdout)["status"] == "cancelled"
    assert cli("cancel", str(run_id)).returncode == 2  # already ended: a user error

    out = cli("resume", str(run_id), timeout=240)  # in the foreground, from the last finished epoch
    assert out.returncode == 0, out.stderr
    assert status_of(JSession, run_id) == RunStatus.succeeded
    assert epochs_of(JSession, run_id) == [1, 2, 3, 4]
    assert f"resuming after epoch {len(kept)}" in (jset.runs_dir / str(run_id) / "train.log").read_text()


@BOTH
def test_a_killed_worker_is_replaced_and_the_run_resumes_exactly(backend, jset, JSession, toy, processes, monkeypatch):
    config = dict(epochs=3, per_class=6)
    # Whether resuming reproduces an uninterrupted run does not depend on the database, and the
    # reference run doubles the test's time: it is checked on SQLite only.
    compare = backend == "sqlite"
    victim = queue_run(JSession, jset, toy, **config)
    first = start_worker(processes, jset.app_home)

    # Kill the worker once the victim's first epoch is recorded and checkpointed (it is in epoch 2).
    last = jset.runs_dir / str(victim) / "last.pt"
    wait_for(lambda: epochs_of(JSession, victim) and last.exists(), 180, "epoch 1 of the victim")
    with JSession() as s:
        child = s.get(Run, victim).pid
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    wait_for(lambda: not alive(child), 10, "the training process to follow its worker")
    assert status_of(JSession, victim) == RunStatus.running  # nobody recorded anything: it looks alive

    # The reference: the same configuration and seed, uninterrupted, trained beside the resumed run.
    both = (victim, queue_run(JSession, jset, toy, **config)) if compare else (victim,)
    # The worker that ensure_worker starts, and its children, are given these settings whole; KEEP_CHECKPOINTS
    # keeps the last epoch's weights, to compare (the model file has the best's).
    two_slots = dataclasses.replace(jset, worker_slots=2, keep_checkpoints=True)
    with Reader(jset) as reader:
        # The dead worker's heartbeat goes stale after STALE s; then a new one is started.
        wait_for(lambda: ensure_worker(two_slots), 30, "ensure_worker to start a replacement", every=0.5)
        wait_for(
            lambda: {status_of(JSession, r) for r in both} == {RunStatus.succeeded},
            240,
            "the runs to finish",
            every=0.5,
        )
    assert not reader.errors and reader.polls > 10

    assert epochs_of(JSession, victim) == [1, 2, 3]
    with JSession() as s:
        assert s.get(Run, victim).attempts == 2
        metrics = {
            r: {e.epoch: e.train_loss for e in s.scalars(select(EpochMetric).where(EpochMetric.run_id == r))}
            for r in both
        }
    log = (jset.runs_dir / str(victim) / "train.log").read_text()
    assert "requeued: no heartbeat" in log and "resuming after epoch 1" in log
    if not compare:
        return
    reference = both[1]
    assert metrics[victim] == pytest.approx(metrics[reference], rel=1e-5)
    resumed, uninterrupted = (
        torch.load(jset.runs_dir / str(r) / "last.pt", weights_only=True)["model"] for r in (victim, reference)
    )
    for name, tensor in uninterrupted.items():
        assert torch.allclose(resumed[name].float(), tensor.float(), rtol=1e-5, atol=1e-6), name


def test_no_worker_is_started_when_workers_run_elsewhere(tmp_path):
    from core.config import load_settings
    from core.jobs.worker import ensure_worker

    settings = load_settings({"APP_HOME": str(tmp_path), "START_WORKER": "0"})
    assert ensure_worker(settings) is False
    assert not (tmp_path / "worker.log").exists()


def test_a_worker_that_exited_on_this_machine_is_replaced_at_once(tmp_path):
    """Its heartbeat is still fresh, but its process is gone: `train --background` must not wait for
    the heartbeat to go stale before a worker takes the queued runs."""
    settings = load_settings({"APP_HOME": str(tmp_path), "STALE_SECONDS": "300"})
    Session = make_sessionmaker(settings.database_url)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with Session.begin() as s:
        s.add(
            Worker(
                id=f"{socket.gethostname()}:{gone.pid}",
                host=socket.gethostname(),
                pid=gone.pid,
                heartbeat_at=utcnow(),
                slots=1,
                run_ids=[],
            )
        )
        # A worker elsewhere is judged by its heartbeat alone (this pid means nothing here).
        s.add(Worker(id="gpu-box:1", host="gpu-box", pid=gone.pid, heartbeat_at=utcnow(), slots=1, run_ids=[]))
    try:
        with Session() as s:
            assert [w["host"] for w in worker_status(s, settings)["workers"]] == ["gpu-box"]
        with Session.begin() as s:
            s.delete(s.get(Worker, "gpu-box:1"))
        assert ensure_worker(settings) is True
    finally:
        with Session() as s:
            started = [w.pid for w in s.scalars(select(Worker)) if w.pid != gone.pid]
        for pid in started:  # our own child: killed and reaped here
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert started
