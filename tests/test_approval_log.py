"""The approved model of a class set and the log of predictions, as the Predict page, the API and the
command line share them (core/inference/approval.py, prediction_log.py, service.py).

No training: one model file of an untrained DenseNet-201 at 32 px is written for the module, with a
calibration record written to order (the approval and the log do not depend on what the model
learnt). Each test gets a fresh APP_HOME whose runs are rows made by hand, each with a copy of that
file: the file itself (so that the process's loaded predictor serves them all), or with `own_model`
its description rewritten to name the new run, which gives the file a sha256 of its own. The torch
engine (INFERENCE_ENGINE=torch) keeps the tests from exporting the model to ONNX.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from core.__main__ import main
from core.access.accounts import EDITOR, LOCAL_USER, VIEWER, User
from core.access.limits import GB, disk_usage
from core.config import Settings, load_settings
from core.data.datasets import delete_dataset
from core.data.decoding import load_rgb
from core.errors import UserError
from core.evaluation.calibration import refer_verdict
from core.inference import approval, engine, prediction_log, service
from core.inference.model_file import read_model, write_model
from core.jobs import views
from core.store.db import Dataset, Image, ModelApproval, Prediction, PredictionLog, Run, RunStatus, utcnow
from core.store.engine import make_sessionmaker
from core.store.runs import model_path
from core.training.model import PaperDenseNet
from core.training.run_config import RunConfig
from tests import runs as run_rows
from tests.synthetic import synthetic_image

CLASSES = ("CLL", "FL", "MCL")
# 20 validation images: ten right at 0.95, ten wrong at 0.6 (a temperature and a refer band).
CALIBRATION = {
    "temperature": 1.5,
    "n_val": 20,
    "refer_target": 0.9,
    "refer_threshold": 0.95,
    "val_probs": [[0.95, 0.03, 0.02]] * 10 + [[0.6, 0.3, 0.1]] * 10,
    "val_labels": [0] * 10 + [1] * 10,
}
ANA, VIC = User("ana", EDITOR), User("vic", VIEWER)


@pytest.fixture(scope="module")
def model_source(tmp_path_factory) -> Path:
    """A model file as a run of 32 px leaves one (its run made by `add_run`)."""
    path = tmp_path_factory.mktemp("approval") / "model.safetensors"
    torch.manual_seed(0)
    config = RunConfig(dataset="lymphoma", image_size=32, epochs=1, weights="none", device="cpu").to_dict()
    write_model(
        path,
        PaperDenseNet(len(CLASSES)).state_dict(),
        {
            "run_id": 0,
            "run_created": utcnow().isoformat(),
            "classes": list(CLASSES),
            "config": config,
            "preparation": {"image_size": 32},
            "calibration": CALIBRATION,
        },
    )
    return path


@pytest.fixture
def home(tmp_path) -> Settings:
    return load_settings({"APP_HOME": str(tmp_path / "home"), "INFERENCE_ENGINE": "torch"})


@pytest.fixture
def Session(home):
    return make_sessionmaker(home.database_url)


def add_run(
    settings: Settings,
    source: Path,
    *,
    dataset: str = "lymphoma",
    classes=CLASSES,
    status: RunStatus = RunStatus.succeeded,
    model: bool = True,
    own_model: bool = False,
) -> int:
    """A run row of `dataset` (made when missing) in `status`, with a model file from `source`."""
    own_model = own_model or tuple(classes) != CLASSES
    created = utcnow() if own_model else datetime.fromisoformat(read_model_meta(source)["run_created"])
    state, meta = read_model(source) if model and own_model else (None, {})
    meta = {k: v for k, v in meta.items() if k not in ("run_id", "run_created", "classes")}
    run_id = run_rows.add_run(
        settings, dataset=dataset, classes=classes, config={}, status=status, created=created, weights=state, meta=meta
    )
    if model and not own_model:
        target = model_path(settings, run_id)
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
    return run_id


@functools.cache
def read_model_meta(path: Path) -> dict:
    return read_model(path)[1]


def png(label: str, index: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image(label, index).save(buf, "PNG")
    return buf.getvalue()


IMAGES = [service.ImageInput("cll.png", png("CLL", 40)), service.ImageInput("mcl.png", png("MCL", 41))]


def log_rows(Session) -> list[PredictionLog]:
    with Session() as s:
        return list(s.scalars(select(PredictionLog).order_by(PredictionLog.id)))


# ---------------------------------------------------------------------------------------------
# Approval


def test_approving_a_run_makes_it_the_model_that_classifying_without_a_run_uses(model_source, home, Session):
    first, second = add_run(home, model_source), add_run(home, model_source, own_model=True)
    with Session() as s, pytest.raises(UserError, match="No model is approved yet.*python -m core approve"):
        service.resolve_run(s, home, None)

    with Session.begin() as s:
        approval.approve(s, home, first, ANA, "checked on the March slides")
    (result,) = service.classify(Session, home, VIC, IMAGES[:1], source="api")
    assert result.run_id == first
    assert result.model_sha256 == hashlib.sha256(model_path(home, first).read_bytes()).hexdigest()

    with Session.begin() as s:
        approval.approve(s, home, second, User("bo", EDITOR), "retrained with more specimens")
    (result,) = service.classify(Session, home, VIC, IMAGES[:1], source="api")
    assert result.run_id == second
    assert result.model_sha256 == hashlib.sha256(model_path(home, second).read_bytes()).hexdigest()
    assert [r.run_id for r in log_rows(Session)] == [first, second]

    with Session() as s:
        assert approval.approved_run(s, ["MCL", "CLL", "FL"]).run_id == second  # any order of the class names
        assert approval.approved_run(s, ["CLL", "FL"]) is None
        history = approval.approval_history(s)
    # Both approvals are kept, newest first, with who and when; the first was ended by the second.
    assert [(a.run_id, a.approved_by, a.note, a.state) for a in history] == [
        (second, "bo", "retrained with more specimens", "approved"),
        (first, "ana", "checked on the March slides", "replaced"),
    ]
    assert history[1].withdrawn_by == "bo" and history[1].replaced_by == history[0].id
    assert history[1].approved_at <= history[0].approved_at == history[1].withdrawn_at
    assert history[0].classes == CLASSES and history[0].run_label == f"run {second} · lymphoma"


def test_only_an_editor_can_approve_and_only_a_succeeded_run_with_its_model_file(model_source, home, Session):
    good = add_run(home, model_source)
    failed = add_run(home, model_source, status=RunStatus.failed, model=False)
    missing = add_run(home, model_source, model=False)
    cases = [
        (good, VIC, "vic is signed in as a viewer: only editors can approve models"),
        (failed, ANA, f"Run {failed} is failed: only a run that succeeded has a model to approve"),
        (missing, ANA, f"Run {missing} has no model file"),
        (999, ANA, "No run with id 999"),
    ]
    for run_id, user, message in cases:
        with Session.begin() as s, pytest.raises(UserError, match=message):
            approval.approve(s, home, run_id, user, "")
    model_path(home, good).write_bytes(b"not a model")
    with Session.begin() as s, pytest.raises(UserError, match=f"Run {good}'s model file is damaged"):
        approval.approve(s, home, good, ANA, "")
    with Session() as s:
        assert s.scalars(select(ModelApproval)).all() == []


def test_withdrawing_leaves_no_approved_model_and_each_class_set_has_its_own(model_source, home, Session):
    first, second = add_run(home, model_source), add_run(home, model_source)
    letters = add_run(home, model_source, dataset="letters", classes=("A", "B", "C"))
    with Session.begin() as s:
        approval.approve(s, home, first, ANA, "")
        approval.approve(s, home, second, ANA, "")
        approval.approve(s, home, letters, ANA, "")
    with Session() as s:
        assert approval.approved_run(s, CLASSES).run_id == second
        assert approval.approved_run(s).run_id == letters  # the most recently approved of any class set
        panel = views.approval_panel(s)
    assert panel.approved_run_ids == {CLASSES: second, ("A", "B", "C"): letters}
    assert panel.of_run(second).note == "" and panel.of_run(first) is None and panel.default.run_id == letters
    assert [a.state for a in panel.history] == ["approved", "approved", "replaced"]

    with Session.begin() as s, pytest.raises(UserError, match="only editors can withdraw"):
        approval.withdraw(s, second, VIC)
    with Session.begin() as s:
        approval.withdraw(s, second, ANA)
    with Session() as s:
        # Not the older approval of the same class set: withdrawn means none until an editor approves one.
        assert approval.approved_run(s, CLASSES) is None
        assert [(a.run_id, a.state, a.withdrawn_by) for a in approval.approval_history(s)][1] == (
            second,
            "withdrawn",
            "ana",
        )

    with Session.begin() as s:  # deleting a dataset deletes its runs; their approval stays, naming no run
        delete_dataset(s, home, "letters", user=LOCAL_USER)
    with Session() as s:
        gone = approval.approved_run(s)
        assert gone.run_id is None and gone.run_label == f"run {letters} · letters"
        with pytest.raises(UserError, match=f"approved model for A, B, C \\(run {letters} · letters\\) was deleted"):
            service.resolve_run(s, home, None)


# ---------------------------------------------------------------------------------------------
# Classifying and the log


def test_classify_answers_as_the_predict_page_and_logs_one_row_per_image(model_source, home, Session):
    run_id = add_run(home, model_source)
    results = service.classify(Session, home, VIC, IMAGES, run_id=run_id, source="page", target=0.95)

    with Session() as s:
        predictor = engine.get_predictor(s, home, run_id)
    images = [load_rgb(io.BytesIO(im.data)) for im in IMAGES]
    expected = predictor.predict(images)
    shown = expected.shown
    threshold = predictor.refer_threshold(0.95)
    assert predictor.temperature is not None
    for result, probs, refer in zip(results, shown, refer_verdict(shown, threshold)):
        assert np.allclose([result.probabilities[c] for c in CLASSES], probs, atol=1e-6)
        assert result.predicted == CLASSES[int(probs.argmax())] and result.kind == "calibrated"
        assert result.refer == bool(refer) and result.threshold == threshold

    rows = log_rows(Session)
    sha = hashlib.sha256(model_path(home, run_id).read_bytes()).hexdigest()
    assert len(rows) == len(IMAGES)
    for row, image, result in zip(rows, IMAGES, results):
        assert (row.user, row.source, row.run_id, row.model_sha256) == ("vic", "page", run_id, sha)
        assert row.image_sha256 == hashlib.sha256(image.data).hexdigest() and row.image_name == image.name
        assert (row.width, row.height, row.size_bytes) == (64, 48, len(image.data))
        assert row.probabilities == result.probabilities and row.probability_kind == "calibrated"
        assert (row.predicted, row.refer, row.threshold) == (result.predicted, result.refer, threshold)

    (raw,) = service.classify(Session, home, VIC, IMAGES[:1], run_id=run_id, source="cli", calibrated=False, log=False)
    assert (raw.kind, raw.refer, raw.threshold) == ("raw", None, None)
    assert np.allclose([raw.probabilities[c] for c in CLASSES], expected.raw[0], atol=1e-6)
    with pytest.raises(UserError, match="notes.txt: "):
        service.classify(
            Session, home, VIC, [IMAGES[0], service.ImageInput("notes.txt", b"hello")], run_id=run_id, source="page"
        )
    assert len(log_rows(Session)) == len(IMAGES)  # neither the unlogged call nor the refused one


def entry(**changes) -> prediction_log.LogEntry:
    base = prediction_log.LogEntry(
        user="ana",
        source="page",
        run_id=1,
        model_sha256="m" * 64,
        image_sha256="i" * 64,
        image_name="a.tif",
        width=64,
        height=48,
        size_bytes=100,
        probabilities={"CLL": 0.7, "FL": 0.2, "MCL": 0.1},
        probability_kind="calibrated",
        predicted="CLL",
        refer=False,
        threshold=0.6,
    )
    return dataclasses.replace(base, **changes)


def test_the_log_is_filtered_written_as_csv_and_pruned_after_prediction_log_days(home, Session):
    now = utcnow()
    with Session.begin() as s:
        prediction_log.record(
            s,
            [
                entry(),
                entry(user="bo", run_id=2, predicted="FL", refer=None, threshold=None, image_name="b,=1.tif"),
                entry(source="cli", predicted="MCL"),
            ],
        )
        ages = {1: 400, 2: 10, 3: 0}
        for row in s.scalars(select(PredictionLog)):
            row.at = now - timedelta(days=ages[row.id])
    with Session() as s:

        def ids(**filters):
            return [r.id for r in prediction_log.list_predictions(s, **filters)]

        assert ids() == [3, 2, 1]  # newest first
        assert ids(run_id=2) == [2] and ids(user="ana") == [3, 1] and ids(predicted="MCL") == [3]
        assert ids(since=now - timedelta(days=30)) == [3, 2] and ids(until=now - timedelta(days=30)) == [1]
        assert ids(limit=1) == [3]
        history = views.prediction_history(s, reader=None, user="ana", limit=1)
        text = prediction_log.to_csv(prediction_log.list_predictions(s))
    assert [r.id for r in history.rows] == [3] and history.truncated and history.classes == CLASSES
    assert history.choices == prediction_log.LogValues(("ana", "bo"), (1, 2), ("CLL", "FL", "MCL"))
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["image_name"] for r in table] == ["a.tif", "b,=1.tif", "a.tif"]
    assert table[1]["refer"] == "" and table[2]["refer"] == "0" and table[0]["CLL"] == "0.7000"
    assert list(table[0])[-3:] == list(CLASSES)

    with Session.begin() as s:  # 0: kept for ever
        assert prediction_log.prune(s, dataclasses.replace(home, prediction_log_days=0)) == 0
    with Session.begin() as s:
        assert prediction_log.prune(s, home) == 1  # the default, 365 days
    with Session.begin() as s:
        assert prediction_log.prune(s, dataclasses.replace(home, prediction_log_days=5)) == 1
    assert [r.id for r in log_rows(Session)] == [3]
    assert load_settings({"PREDICTION_LOG_DAYS": "30"}).prediction_log_days == 30


def test_images_are_kept_only_with_prediction_log_images_and_count_against_the_disk_limit(model_source, home, Session):
    run_id = add_run(home, model_source)
    # REVIEWS=0: no referred image is kept for review either (tests/test_reviews.py keeps those).
    service.classify(Session, dataclasses.replace(home, reviews=False), VIC, IMAGES, run_id=run_id, source="page")
    assert not home.prediction_images_dir.exists()
    assert all(r.stored_path is None for r in log_rows(Session))

    keeping = load_settings({"APP_HOME": str(home.app_home), "INFERENCE_ENGINE": "torch", "PREDICTION_LOG_IMAGES": "1"})
    service.classify(Session, keeping, VIC, [*IMAGES, IMAGES[0]], run_id=run_id, source="page")
    kept = log_rows(Session)[2:]
    assert [r.stored_path for r in kept] == [prediction_log.stored_path(r.image_sha256) for r in kept]
    for row, image in zip(kept, [*IMAGES, IMAGES[0]]):
        assert (home.app_home / row.stored_path).read_bytes() == image.data
    assert sorted(p.name for p in home.prediction_images_dir.rglob("*") if p.is_file()) == sorted(
        {hashlib.sha256(im.data).hexdigest() for im in IMAGES}
    )  # one file per content

    new = service.ImageInput("new.png", png("FL", 42))
    tight = dataclasses.replace(keeping, max_disk_gb=(disk_usage(keeping) + len(new.data) // 2) / GB)
    with pytest.raises(UserError, match="MAX_DISK_GB"):
        service.classify(Session, tight, VIC, [new], run_id=run_id, source="page")
    assert len(log_rows(Session)) == 5  # refused before anything was classified or logged

    with Session.begin() as s:  # pruning the rows removes the images no row names any more
        for row in s.scalars(select(PredictionLog)):
            row.at = utcnow() - timedelta(days=400)
        assert prediction_log.prune(s, keeping) == 5
    assert not any(p.is_file() for p in home.prediction_images_dir.rglob("*"))


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_approve_then_predict_with_the_approved_model_and_log_it(
    model_source, home, Session, monkeypatch, capsys, tmp_path
):
    run_id = add_run(home, model_source)
    monkeypatch.setenv("APP_HOME", str(home.app_home))
    monkeypatch.setenv("INFERENCE_ENGINE", "torch")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    image = tmp_path / "x.png"
    image.write_bytes(IMAGES[1].data)

    assert main(["predict", str(image)]) == 2
    assert "No model is approved yet" in capsys.readouterr().err
    assert main(["approve", str(run_id), "--note", "validated", "--user", "ana"]) == 0
    assert f"run {run_id}: approved for CLL, FL, MCL by ana" in capsys.readouterr().out
    assert main(["approvals"]) == 0
    assert "validated" in capsys.readouterr().out

    assert main(["predict", "--log", "--user", "cy", str(image)]) == 0
    out = capsys.readouterr()
    (row,) = csv.DictReader(io.StringIO(out.out))
    assert row["probability_kind"] == "calibrated" and f"run {run_id}" in out.err

    assert main(["predictions", "--csv", "--since", "2000-01-01"]) == 0
    (logged,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert (logged["user"], logged["source"], logged["run_id"], logged["predicted"]) == (
        "cy",
        "cli",
        str(run_id),
        row["predicted"],
    )
    assert logged["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert float(logged[row["predicted"]]) == pytest.approx(float(row[row["predicted"]]), abs=1e-4)
    assert main(["predictions", "--since", "yesterday"]) == 2


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def test_the_tables_work_on_postgresql(postgres_url):
    Session = make_sessionmaker(postgres_url)
    with Session.begin() as s:
        dataset = Dataset(name="d", classes=list(CLASSES))
        s.add(dataset)
        s.flush()
        run = Run(dataset_id=dataset.id, experiment="e", config={}, seed=0, status=RunStatus.succeeded)
        s.add(run)
        s.flush()
        s.add(
            ModelApproval(
                class_set=approval.class_set_key(CLASSES),
                run_id=run.id,
                run_label=f"run {run.id} · d",
                model_sha256="m" * 64,
                approved_by="ana",
            )
        )
        prediction_log.record(s, [entry(run_id=run.id)])
    with Session() as s:
        assert approval.approved_run(s, CLASSES).run_id == run.id
        assert [r.probabilities for r in prediction_log.list_predictions(s, run_id=run.id)] == [entry().probabilities]
    with Session.begin() as s:
        s.delete(s.get(Dataset, dataset.id))
    with Session() as s:
        assert approval.approved_run(s, CLASSES).run_id is None  # the run went; the approval stays
        assert len(prediction_log.list_predictions(s)) == 1


def test_approving_a_model_that_refers_everything_and_may_be_chance_asks_first(
    model_source, home, Session, monkeypatch, capsys
):
    """A weak model: 26 validation images from which no threshold can promise 90%, and 8 of 20 test
    images right (an interval that reaches chance). Approving it names both reasons and needs --despite."""
    from core.jobs.comparisons import approval_concerns

    run_id = add_run(home, model_source)
    with Session.begin() as s:
        run = s.get(Run, run_id)
        images = [
            Image(
                dataset_id=run.dataset_id,
                sha256=f"{i:064x}",
                stored_path=f"images/{i}.png",
                label="CLL",
                original_name=f"{i}.png",
                width=64,
                height=64,
                mode="RGB",
            )
            for i in range(20)
        ]
        s.add_all(images)
        s.flush()
        s.add_all(
            Prediction(
                run_id=run_id,
                image_id=im.id,
                true_label=0,
                predicted_label=0 if k < 8 else 1,
                probabilities=[0.4, 0.3, 0.3],
            )
            for k, im in enumerate(images)
        )
        run.summary = {
            "test_accuracy": 0.4,
            "calibration": {
                "temperature": 1.0,
                "n_val": 26,
                "refer_target": 0.9,
                "val_probs": [[0.5, 0.3, 0.2]] * 26,
                "val_labels": [0] * 14 + [1] * 12,
            },
        }
    with Session() as s:
        concerns = approval_concerns(s, run_id)
    assert len(concerns) == 2 and "every prediction" in concerns[0] and "reaches chance" in concerns[1]

    monkeypatch.setenv("APP_HOME", str(home.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["approve", str(run_id), "--note", "looks fine", "--user", "ana"]) == 2
    err = capsys.readouterr().err
    assert "was not approved" in err and "uncertain, refer" in err and "--despite" in err
    with Session() as s:
        assert approval.approved_run(s) is None
    assert main(["approve", str(run_id), "--note", "for the demo only", "--user", "ana", "--despite"]) == 0
    with Session() as s:
        assert approval.approved_run(s).run_id == run_id
