"""The views (core/jobs/views/): page-ready records, one query per list of runs; and a run's JSON
columns as typed records (core/store/records.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from sqlalchemy import event, update

from core.access.accounts import LOCAL_USER
from core.evaluation.calibration import run_calibration
from core.jobs import runs, views
from core.store.db import EpochMetric, Run, RunStatus
from core.store.engine import engine_of
from core.store.records import CalibrationRecord, LeakAudit, RunProgress, RunSummary, Yardstick
from core.training.run_config import RunConfig
from tests.synthetic import write_dataset

TINY = dict(image_size=32, epochs=2, per_class=4, batch_size=4, weights="none", device="cpu")


# ---------------------------------------------------------------------------------------------
# The views


@pytest.fixture
def recorded(settings, Session, tmp_path) -> list[int]:
    """Four runs of a tiny dataset (none trained): queued, running with an epoch, failed, and a
    succeeded one with two epochs and a summary. Their ids, oldest first."""
    from core.data.ingest import ingest

    write_dataset(tmp_path / "src", per_class=4)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "tiny", user=LOCAL_USER)
        made = [
            runs.create_runs(s, settings, RunConfig(dataset="tiny", seed=seed, **TINY), user=LOCAL_USER)[0]
            for seed in range(4)
        ]
        made[1].status, made[1].progress = (
            RunStatus.running,
            {"stage": "train", "epoch": 1, "epochs": 2, "step": 3, "steps": 4},
        )
        made[2].status, made[2].error = RunStatus.failed, "out of memory"
        made[3].status = RunStatus.succeeded
        made[3].summary = RunSummary(test_accuracy=0.75, best_epoch=2, protocol="holdout 80/20, seed 3").to_dict()
        s.flush()
        for run, epochs in ((made[1], 1), (made[3], 2)):
            s.add_all(
                EpochMetric(
                    run_id=run.id,
                    epoch=e,
                    train_loss=1.0,
                    train_accuracy=0.5,
                    val_loss=1.0,
                    val_accuracy=0.5,
                    seconds=1.0,
                    images_per_second=4.0,
                )
                for e in range(1, epochs + 1)
            )
        return [r.id for r in made]


def statements(Session, view) -> tuple[object, int]:
    """What `view(session)` returns, and how many SQL statements it ran."""
    count = 0

    def counted(*_args) -> None:
        nonlocal count
        count += 1

    engine = engine_of(Session)
    event.listen(engine, "before_cursor_execute", counted)
    try:
        with Session() as s:
            result = view(s)
    finally:
        event.remove(engine, "before_cursor_execute", counted)
    return result, count


def test_the_train_pages_queue_is_one_query(recorded, Session):
    queued, running, _, _ = recorded
    rows, count = statements(Session, views.active_runs)
    assert count == 1
    assert [r.id for r in rows] == [queued, running]  # in the order the worker takes them


def test_the_runs_page_records(recorded, Session):
    queued, running, failed, done = recorded
    rows, count = statements(Session, views.run_rows)
    assert count == 1
    assert [r.id for r in rows] == [done, failed, running, queued]  # newest first
    by_id = {r.id: r for r in rows}
    assert by_id[done].summary.test_accuracy == 0.75 and by_id[done].protocol == "holdout 80/20, seed 3"
    assert by_id[queued].protocol.startswith("holdout 80/20")  # from its split until it records its own
    assert [by_id[i].epochs_done for i in recorded] == [0, 1, 0, 2]
    assert by_id[running].progress_bar() == (pytest.approx((0 + 3 / 4) / 2), "Epoch 1 of 2, step 3 of 4")
    assert by_id[queued].progress_bar() == (0.0, "Queued: waiting for the worker")
    assert by_id[done].label() == (
        f"Run {done} · tiny · holdout · 32 px · 2 epochs · random start · 4 per class · batch 4 · seed 3 · 75.0%"
    )  # what differs from the paper's settings
    assert [by_id[i].active for i in recorded] == [True, True, False, False]
    assert all(dataclasses.is_dataclass(r) and not isinstance(r, Run) for r in rows)  # no ORM object
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_id[done].status = "failed"

    curves, count = statements(Session, lambda s: views.run_curves(s, [done, running, 12345]))
    assert count == 1
    assert [c.run.id for c in curves] == [done, running]
    assert [e.epoch for e in curves[0].epochs] == [1, 2]


def test_dataset_rows_are_one_query(recorded, Session):
    rows, count = statements(Session, views.dataset_rows)
    assert count == 1
    assert rows == [views.DatasetRow("tiny", ("CLL", "FL", "MCL"), 12, 0)]


def test_the_best_honest_run_prefers_grouped_splits_and_never_the_leaky_protocol(recorded, settings, Session):
    _, _, _, done = recorded
    with Session.begin() as s:
        leaky = runs.create_runs(s, settings, RunConfig(dataset="tiny", split="paper-leaky", **TINY), user=LOCAL_USER)[
            0
        ]
        failed = runs.create_runs(s, settings, RunConfig(dataset="tiny", seed=9, **TINY), user=LOCAL_USER)[0]
        leaky.status = failed.status = RunStatus.succeeded
        leaky.summary = RunSummary(test_accuracy=0.99).to_dict()
        failed.status, failed.summary = RunStatus.failed, RunSummary(test_accuracy=1.0).to_dict()
    with Session() as s:
        rows = views.run_rows(s)
    assert views.best_honest_run(rows).id == done  # the leaky 99% and the failed run do not count
    # A run split by specimen comes before a better one split by image.
    grouped = dataclasses.replace(
        rows[-1], id=999, status="succeeded", grouped=True, summary=RunSummary(test_accuracy=0.5)
    )
    assert views.best_honest_run([*rows, grouped]).id == 999
    assert views.best_honest_run([r for r in rows if r.id != done]) is None


# ---------------------------------------------------------------------------------------------
# A run's JSON columns


def test_run_summary_and_progress_round_trip_and_read_old_rows():
    nested = {
        "calibration": CalibrationRecord(
            temperature=1.5, n_val=2, val_probs=((0.6, 0.4), (0.3, 0.7)), val_labels=(0, 1)
        ),
        "leak_audit": LeakAudit(n_test=4, close=1, summary="4 test vs 12 training images"),
        "colour_yardstick": Yardstick(0.75, 12, 4, ((3, True), (9, False))),
    }
    full = RunSummary(**{f.name: nested.get(f.name, i + 1) for i, f in enumerate(dataclasses.fields(RunSummary))})
    assert RunSummary.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    old = {"test_accuracy": 0.5, "n_test": 8, "a_key_since_removed": 1}  # a row written by an older version
    assert RunSummary.from_dict(old) == RunSummary(test_accuracy=0.5, n_test=8)
    assert RunSummary.from_dict(None) == RunSummary.from_dict({}) == RunSummary()
    assert RunSummary().to_dict() == {}
    assert RunSummary(calibration=CalibrationRecord(temperature=1.5)).temperature == 1.5
    assert RunSummary().temperature is None

    for progress in (
        RunProgress(stage="decode", done=3, total=9),
        RunProgress(stage="train", epoch=2, epochs=5, step=1, steps=10),
    ):
        assert RunProgress.from_dict(json.loads(json.dumps(progress.to_dict()))) == progress
    assert RunProgress.from_dict({}).bar(5) == (0.0, "Preparing data (decode, split, augment)")
    assert RunProgress(stage="decode", done=3, total=9).bar(5) == (0.0, "Preparing data: decode 3 of 9")


def test_nested_records_are_typed_and_keep_the_json_of_old_and_new_rows():
    """The summary's calibration, leak audit and colour yardstick read as typed records and are written
    back in the shape they were stored in: a row read and written again is unchanged, whatever version
    wrote it; keys an older version lacked read as defaults (and stay absent), unknown keys are left out."""
    rng = np.random.default_rng(0)
    record = run_calibration(
        rng.dirichlet(np.ones(3), 30), rng.integers(0, 3, 30), rng.dirichlet(np.ones(3), 10), rng.integers(0, 3, 10)
    )
    stored = {
        "calibration": json.loads(json.dumps(record.to_dict())),
        "leak_audit": {
            "warning": None,
            "verdict": "No copies found.",
            "summary": "6 test vs 24 training images",
            "n_test": 6,
            "expected_close": 0.06,
            "exact": 0,
            "near": 0,
            "close": 0,
            "nn_ratio": None,
        },
        "colour_yardstick": {"accuracy": 0.5, "n_train": 24, "n_test": 6, "correct": {"3": True, "9": False}},
    }
    assert set(stored["calibration"]) == {  # the keys run_calibration has always written
        "temperature",
        "n_val",
        "val_ece_before",
        "val_ece_after",
        "val_nll_before",
        "val_nll_after",
        "refer_target",
        "refer_threshold",
        "refer_confidence",
        "refer_bound",
        "refer_accepted",
        "val_probs",
        "val_labels",
        "test_ece_before",
        "test_ece_after",
        "test_coverage",
        "test_accepted_accuracy",
    }
    summary = RunSummary.from_dict(stored)
    assert summary.to_dict() == stored
    assert summary.calibration.val_probs[0] == tuple(stored["calibration"]["val_probs"][0])
    assert summary.leak_audit.nn_ratio is None and summary.colour_yardstick.correct == ((3, True), (9, False))

    older = {
        "calibration": {
            "temperature": 1.2,
            "n_val": 2,
            "refer_target": 0.9,
            "refer_threshold": None,
            "val_probs": [[0.6, 0.4], [0.3, 0.7]],
            "val_labels": [0, 1],
            "test_ece_before": 0.2,
            "test_ece_after": 0.1,
        },
        "leak_audit": {
            "warning": None,
            "summary": "4 test vs 12 training images",
            "n_test": 4,
            "exact": 0,
            "near": 0,
            "close": 1,
            "nn_ratio": 1.1,
        },
        "colour_yardstick": {"accuracy": 0.75, "n_train": 12, "n_test": 4},
    }
    again = RunSummary.from_dict({**older, "calibration": {**older["calibration"], "a_key_since_removed": 1}})
    assert again.calibration.val_nll_before is None and again.calibration.refer_confidence is None
    assert again.leak_audit.verdict is None and again.leak_audit.expected_close is None
    assert again.colour_yardstick.correct is None
    assert again.to_dict() == older
    uncalibrated = {"calibration": {"temperature": None, "note": "no validation part"}}
    assert RunSummary.from_dict(uncalibrated).to_dict() == uncalibrated


def test_time_left_follows_the_speed_of_the_last_steps_when_the_machine_slows(settings, Session, recorded, tmp_path):
    """A fake clock: steps of 0.1 s, then the machine gets busy and they take 0.5 s. The time left
    and the speed follow within the epoch, and the page is told the speed has fallen."""
    from core.jobs.recording import Recorder

    running = recorded[1]  # epoch 1 of 2 recorded at 4 images/s (1 s per epoch of 4 steps)
    now = [0.0]
    recorder = Recorder(Session, running, tmp_path, None, {}, epochs=2, clock=lambda: now[0])
    steps = 400

    def curve() -> views.RunCurves:
        with Session() as s:
            return views.run_curves(s, [running])[0]

    for step in range(1, 101):
        now[0] += 0.1
        recorder.on_step(2, step, steps)
    fast = curve()
    assert fast.remaining_seconds() == pytest.approx(300 * 0.1, rel=0.02)
    assert fast.speed_now() == pytest.approx(4 / 0.1, rel=0.02) and fast.slowed_to() is None

    for step in range(101, 201):  # 50 s at 0.5 s a step: the window of recent steps is all slow now
        now[0] += 0.5
        recorder.on_step(2, step, steps)
    slow = curve()
    assert slow.remaining_seconds() == pytest.approx(200 * 0.5, rel=0.02)
    assert slow.speed_now() == pytest.approx(8.0, rel=0.02)
    # The finished epoch went at 4 images/s; 8 now is faster, so nothing fell. Against a faster epoch:
    with Session.begin() as s:
        s.execute(update(EpochMetric).where(EpochMetric.run_id == running).values(images_per_second=40.0))
    assert curve().slowed_to() == pytest.approx(0.2, rel=0.02)
