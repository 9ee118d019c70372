"""Ids that never come back, caches keyed by what cannot come back, deleting a dataset while it is
ingested into or trained on, and runs that cannot write.

A race is two threads released together by a barrier, the second after a small varying delay,
repeated many times; afterwards the database and the files must agree (core/store/consistency.py, deep
check). The races run on SQLite and on PostgreSQL (tests/pg.py starts a throwaway server).
"""

from __future__ import annotations

import errno
import io
import os
import random
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from sqlalchemy import event, select, text
from streamlit.testing.v1 import AppTest

from core.access.accounts import LOCAL_USER
from core.config import load_settings
from core.data.datasets import delete_dataset, get_dataset, image_path
from core.data.ingest import ingest
from core.errors import UserError
from core.inference import predict
from core.inference.model_file import write_model, write_weights
from core.jobs import execute, queue, runs
from core.jobs.worker import WorkerLoop
from core.store import consistency
from core.store.db import Base, Image, Run, RunStatus
from core.store.engine import make_sessionmaker
from core.store.runs import model_path
from core.training.run_config import RunConfig
from tests.synthetic import synthetic_image, write_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, per_class=4, batch_size=4, lr=1e-3, weights="none", device="cpu", epochs=1, seed=3)
ROUNDS = 25  # races repeated: enough that code without the locks fails each time on a test machine


@pytest.fixture
def backend(request) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def rset(request, backend, tmp_path):
    """Settings on SQLite (a file), or on a fresh PostgreSQL database."""
    env = {"APP_HOME": str(tmp_path / "home")}
    if backend == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    return load_settings(env)


@pytest.fixture
def RSession(rset):
    return make_sessionmaker(rset.database_url)


@pytest.fixture
def source(tmp_path) -> Path:
    return write_dataset(tmp_path / "src", per_class=4, classes=("CLL", "FL"))


def _ingest(Session, settings, folder: Path, name: str) -> None:
    with Session.begin() as s:
        ingest(s, settings, folder, name, user=LOCAL_USER)


def _together(first, second, delay: float) -> dict[str, BaseException | object]:
    """Run first() and second() in two threads released at once, second() `delay` s later (first()
    `-delay` s later when it is negative); what each returned or raised."""
    barrier = threading.Barrier(2)
    out: dict[str, BaseException | object] = {}

    def call(key, fn, wait):
        barrier.wait()
        if wait:
            threading.Event().wait(wait)
        try:
            out[key] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test looks at what was raised
            out[key] = exc

    threads = [
        threading.Thread(target=call, args=("first", first, max(0.0, -delay))),
        threading.Thread(target=call, args=("second", second, max(0.0, delay))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _deep_check_clean(Session, settings) -> None:
    report = consistency.check(Session, settings, deep=True)
    assert report.clean, report.format()


# ---------------------------------------------------------------------------------------------
# Ids


def test_ids_of_deleted_rows_are_never_given_again(settings, Session, source):
    _ingest(Session, settings, source, "a")
    with Session.begin() as s:
        first = runs.create_runs(s, settings, RunConfig(dataset="a", **TINY), user=LOCAL_USER)[0].id
        last = runs.create_runs(s, settings, RunConfig(dataset="a", **{**TINY, "seed": 4}), user=LOCAL_USER)[0].id
    with Session.begin() as s:
        s.delete(s.get(Run, last))
    with Session.begin() as s:
        new = runs.create_runs(s, settings, RunConfig(dataset="a", **{**TINY, "seed": 5}), user=LOCAL_USER)[0].id
        old_dataset = get_dataset(s, "a").id
    assert first < last < new
    with Session.begin() as s:
        s.execute(Run.__table__.update().values(status=RunStatus.cancelled))
        delete_dataset(s, settings, "a", user=LOCAL_USER)
    _ingest(Session, settings, source, "a")
    with Session() as s:
        assert get_dataset(s, "a").id > old_dataset
        schema = dict(s.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'")).all())
    # Every table with an integer id, so no id names two different things over time.
    integer_ids = [
        t.name for t in Base.metadata.sorted_tables if [c.type.python_type for c in t.primary_key.columns] == [int]
    ]
    assert {"datasets", "images", "runs", "splits", "augmentation_presets", "predictions"} <= set(integer_ids)
    assert [name for name in integer_ids if "AUTOINCREMENT" not in schema[name]] == []


# ---------------------------------------------------------------------------------------------
# The Predict page's model cache


class TinyNet(torch.nn.Module):
    """Stands in for DenseNet-201, which takes seconds to build and to explain on a CPU: one
    convolution named as DenseNet's last block (where Grad-CAM looks), and one output per class."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(OrderedDict(denseblock4=torch.nn.Conv2d(3, 4, 3, padding=1)))
        self.classifier = torch.nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def _succeeded_run(Session, settings, dataset: str, run_id: int | None = None) -> int:
    """A run of `dataset` marked succeeded, with an untrained model of the dataset's classes as its
    model file (as training would leave); with `run_id`, under that id."""
    with Session.begin() as s:
        ds = get_dataset(s, dataset)
        config = RunConfig(dataset=dataset, **TINY).to_dict()
        run = Run(id=run_id, dataset_id=ds.id, experiment="e", config=config, seed=3, status=RunStatus.succeeded)
        s.add(run)
        s.flush()
        run_id, classes, created = run.id, list(ds.classes), run.created_at.isoformat()
    torch.manual_seed(len(classes))
    write_model(
        model_path(settings, run_id),
        TinyNet(len(classes)).state_dict(),
        {
            "run_id": run_id,
            "run_created": created,
            "classes": classes,
            "config": config,
            "preparation": {"image_size": 32},
            "calibration": {"temperature": None},
        },
    )
    return run_id


def test_a_model_file_is_hashed_once_per_version(settings):
    path = model_path(settings, 7)
    assert predict.model_sha256(settings, 7) is None
    write_weights(path, {"weights": torch.zeros(4)})
    first = predict.model_sha256(settings, 7)
    hashed = predict.file_sha256.cache_info().misses
    assert predict.model_sha256(settings, 7) == first and predict.file_sha256.cache_info().misses == hashed
    # Another model of the same size under the same run id, with the old file's times.
    before = path.stat()
    write_weights(path, {"weights": torch.ones(4)})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert predict.model_sha256(settings, 7) not in (None, first)


def test_the_predict_page_serves_the_model_now_stored_under_a_run_id(settings, Session, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "PaperDenseNet", TinyNet)
    three = write_dataset(tmp_path / "three", per_class=4, classes=("CLL", "FL", "MCL"))
    _ingest(Session, settings, three, "threeclass")
    run_id = _succeeded_run(Session, settings, "threeclass")

    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.setenv("INFERENCE_ENGINE", "torch")  # the stand-in network has no ONNX export
    monkeypatch.delenv("DATABASE_URL", raising=False)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page("pages/predict.py").run()
    buf = io.BytesIO()
    synthetic_image("FL", 99).save(buf, "PNG")
    at.file_uploader(key="pr_files").set_value([("new.png", buf.getvalue(), "image/png")]).run()
    assert not at.exception, at.exception
    assert {"CLL", "FL", "MCL"} <= set(at.dataframe[0].value.columns)

    # The dataset goes, another is trained, and its run gets the same id (as SQLite gives a freed
    # id again in databases made before ids were AUTOINCREMENT).
    with Session.begin() as s:
        delete_dataset(s, settings, "threeclass", user=LOCAL_USER)
    two = write_dataset(tmp_path / "two", per_class=4, classes=("CLL", "FL"))
    _ingest(Session, settings, two, "twoclass")
    assert _succeeded_run(Session, settings, "twoclass", run_id=run_id) == run_id

    at.run()
    assert not at.exception, at.exception
    columns = set(at.dataframe[0].value.columns)
    assert {"CLL", "FL"} <= columns and "MCL" not in columns
    assert any("twoclass" in c.value for c in at.caption)


# ---------------------------------------------------------------------------------------------
# Deleting a dataset while another is ingested


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_ingest_racing_a_delete_of_a_dataset_sharing_its_images_keeps_its_files(rset, RSession, source, tmp_path):
    own = tmp_path / "own"  # one image per class that only "b" has
    for label in ("CLL", "FL"):
        (own / label).mkdir(parents=True)
        synthetic_image(label, 100).save(own / label / "100.tif")
    rng = random.Random(0)
    for _ in range(ROUNDS):
        _ingest(RSession, rset, source, "a")
        _ingest(RSession, rset, own, "b")
        # Every image of `source` is already stored, as a's: b's ingest finds the files there.
        outcome = _together(
            lambda: _ingest(RSession, rset, source, "b"), lambda: _delete(RSession, rset, "a"), rng.uniform(0, 0.008)
        )
        assert outcome == {"first": None, "second": None}, outcome
        with RSession() as s:
            stored = s.scalars(select(Image).where(Image.dataset_id == get_dataset(s, "b").id)).all()
            missing = [im.original_name for im in stored if not image_path(rset, im).is_file()]
        assert len(stored) == 10 and missing == []
        _delete(RSession, rset, "b")
    _ingest(RSession, rset, source, "b")
    _deep_check_clean(RSession, rset)


def _delete(Session, settings, name: str) -> None:
    with Session.begin() as s:
        delete_dataset(s, settings, name, user=LOCAL_USER)


# ---------------------------------------------------------------------------------------------
# Deleting a dataset while runs are launched on it


def _launch(Session, settings, name: str) -> list[int]:
    with Session.begin() as s:
        return [r.id for r in runs.create_runs(s, settings, RunConfig(dataset=name, **TINY), user=LOCAL_USER)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_launch_racing_a_delete_either_queues_runs_that_exist_or_says_the_dataset_was_deleted(rset, RSession, source):
    rng = random.Random(1)
    for i in range(ROUNDS):
        name = f"d{i}"
        _ingest(RSession, rset, source, name)
        outcome = _together(
            lambda: _launch(RSession, rset, name),  # noqa: B023 (both called within this round)
            lambda: _delete(RSession, rset, name),  # noqa: B023
            rng.uniform(-0.01, 0.01),
        )
        launched, deleted = outcome["first"], outcome["second"]
        for result in (launched, deleted):
            assert result is None or isinstance(result, (list, UserError)), repr(result)
        with RSession.begin() as s:
            if isinstance(launched, list):  # then the delete was refused: the runs are queued
                assert launched and s.scalars(select(Run.id).where(Run.id.in_(launched))).all() == launched
                assert isinstance(deleted, UserError) and "queued or running" in str(deleted)
                s.execute(Run.__table__.update().where(Run.id.in_(launched)).values(status=RunStatus.cancelled))
            else:  # gone before the launch looked, or while it waited for the lock
                assert isinstance(launched, UserError) and deleted is None
                assert f"No dataset named '{name}'" in str(launched) or f"Dataset '{name}' was deleted" in str(launched)
    _deep_check_clean(RSession, rset)


# ---------------------------------------------------------------------------------------------
# A full disk


def _disk_full(monkeypatch, engine, refused_writes: int) -> None:
    """From the first checkpoint on the disk is full: the checkpoint's rename fails with ENOSPC, and
    the database refuses the next `refused_writes` writes of a run's status, as SQLite does when it
    cannot grow its files."""
    real_replace = os.replace
    state = {"full": False, "refused": 0}

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".pt"):
            state["full"] = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    def refuse(conn, cursor, statement, parameters, context, executemany):
        if state["full"] and state["refused"] < refused_writes and statement.startswith("UPDATE runs SET status"):
            state["refused"] += 1
            raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(os, "replace", replace)
    event.listen(engine, "before_cursor_execute", refuse)


def test_a_run_that_cannot_write_ends_failed_saying_the_disk_is_full(settings, Session, source, monkeypatch):
    _ingest(Session, settings, source, "a")
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="a", **TINY), user=LOCAL_USER)
    # The real training loop and recorder, on a model that trains in milliseconds.
    monkeypatch.setattr(execute, "build_model", lambda n, weights: (TinyNet(n), "none (a stand-in model)"))
    _disk_full(monkeypatch, queue.engine_of(Session), refused_writes=2)
    with pytest.raises(OSError):
        execute.execute_run(Session, settings, run.id)
    with Session() as s:
        failed = s.get(Run, run.id)
        assert failed.status == RunStatus.failed and failed.finished_at is not None
        assert failed.error.startswith("The disk is full: No space left on device"), failed.error
        assert f"resume {run.id}" in failed.error


def test_the_worker_survives_a_full_disk_and_fails_the_run_it_cannot_start(settings, Session, source, monkeypatch):
    _ingest(Session, settings, source, "a")
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="a", **TINY), user=LOCAL_USER)

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(queue, "note", no_space)
    # In a thread of its own, as in the main thread the loop would take over the test's signals.
    outcome = _together(WorkerLoop(Session, settings, once=True).run, lambda: None, 0)
    assert outcome["first"] == 0, outcome  # it returned (having started no run) instead of raising
    with Session() as s:
        failed = s.get(Run, run.id)
        assert failed.status == RunStatus.failed, failed.status
        assert failed.error.startswith("The disk is full"), failed.error
