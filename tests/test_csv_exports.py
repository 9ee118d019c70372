"""CSV files people open in a spreadsheet: a cell holding a name from outside that would start a
formula (=, +, -, @, tab, carriage return) is written as text, with a leading apostrophe, in every
export: the Runs page's test predictions, the Predict page's results, the prediction log (the
Predict page's history and `predictions --csv`) and `predict`'s output. Numbers stay numbers.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from core.__main__ import main
from core.access.accounts import LOCAL_USER
from core.csv_export import cell, csv_text
from core.data.ingest import ingest
from core.inference import prediction_log
from core.jobs import runs
from core.store.db import Dataset, EpochMetric, Prediction, RunStatus, utcnow
from core.training.run_config import RunConfig
from pages._common import csv_bytes
from tests.synthetic import synthetic_image

ROOT = Path(__file__).resolve().parents[1]
LINK = '=HYPERLINK("http:evil.test","Sign in again")'
FORMULAS = [LINK, "+1+cmd", "-2+3", "@SUM(A1)", "\t=1+1", "\r=1+1"]
CLASSES = ["CLL", "@FL"]  # a class folder named like a formula: its images' paths start with it
FILES = [f"{LINK} 001.png", "+cmd 002.png", "-2+3 003.png", "@SUM(A1) 004.png"]
GROUP = "=cmd|' /C calc'!A0"


def parsed(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_text_that_would_start_a_formula_gets_an_apostrophe_and_numbers_stay_numbers():
    rows = [[text, -0.25, 3, "-0.5", "+1e-3", None, "plain = text"] for text in FORMULAS]
    table = list(csv.reader(io.StringIO(csv_text(["@name", "p", "n", "text number", "exponent", "none", "x"], rows))))
    assert table[0][0] == "'@name"
    for text, row in zip(FORMULAS, table[1:]):
        assert row[0] == "'" + text
        assert row[1:] == ["-0.25", "3", "-0.5", "+1e-3", "", "plain = text"]  # a number is no formula
        assert float(row[1]) == -0.25 and float(row[3]) == -0.5
    assert cell(-1) == -1 and cell("CLL/001.png") == "CLL/001.png"


def test_the_predict_pages_results_table_is_written_as_text(monkeypatch):
    """The Predict page's results (file, verdict and one probability column per class)."""
    table = pd.DataFrame(
        [{"file": name, "predicted": "@FL", "confidence": 0.75, "@FL": 0.75, "CLL": 0.25} for name in FILES]
    )
    rows = parsed(csv_bytes(table).decode())
    assert [r["file"] for r in rows] == ["'" + name for name in FILES]
    assert {r["predicted"] for r in rows} == {"'@FL"} and "'@FL" in rows[0]
    assert all(float(r["confidence"]) == 0.75 and float(r["CLL"]) == 0.25 for r in rows)


def entry(name: str) -> prediction_log.LogEntry:
    return prediction_log.LogEntry(
        user="@ana",
        source="page",
        run_id=1,
        model_sha256="m" * 64,
        image_sha256="i" * 64,
        image_name=name,
        width=64,
        height=48,
        size_bytes=100,
        probabilities={"CLL": 0.7, "@FL": 0.3},
        probability_kind="calibrated",
        predicted="CLL",
        refer=False,
        threshold=0.6,
    )


def test_the_prediction_log_as_csv_on_the_page_and_on_the_command_line(settings, Session, monkeypatch, capsys):
    with Session.begin() as s:
        prediction_log.record(s, [entry(name) for name in FILES])
    with Session() as s:
        page = prediction_log.to_csv(prediction_log.list_predictions(s))  # the History tab's "Log (.csv)"
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["predictions", "--csv"]) == 0
    for text in (page, capsys.readouterr().out):
        rows = parsed(text)
        assert sorted(r["image_name"] for r in rows) == sorted("'" + name for name in FILES)
        assert {r["user"] for r in rows} == {"'@ana"} and "'@FL" in rows[0]
        assert all(
            float(r["CLL"]) == 0.7 and float(r["refer_threshold"]) == 0.6 and int(r["width"]) == 64 for r in rows
        )


def test_predict_on_the_command_line_writes_names_as_text(settings, monkeypatch, capsys, tmp_path):
    from core.inference import service

    for name in FILES:
        synthetic_image("CLL", 0, (32, 32)).save(tmp_path / name, "PNG")
    monkeypatch.chdir(tmp_path)  # the images named as they are in the folder: the output names them so

    def classify(Session, settings, user, images, **kwargs):  # the answers, without a model
        return [
            service.Classified(
                name=image.name,
                image_sha256="0" * 64,
                width=32,
                height=32,
                size_bytes=9,
                predicted="@FL",
                probabilities={"CLL": 0.25, "@FL": 0.75},
                kind="calibrated",
                refer=False,
                threshold=0.5,
                run_id=1,
                model_sha256="1" * 64,
                refer_target=0.9,
            )
            for image in images
        ]

    monkeypatch.setattr(service, "classify", classify)
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["predict", "--run", "1", *FILES]) == 0
    rows = parsed(capsys.readouterr().out)
    assert [r["image_name"] for r in rows] == ["'" + name for name in FILES]
    assert {r["predicted"] for r in rows} == {"'@FL"} and all(float(r["'@FL"]) == 0.75 for r in rows)


def test_the_runs_pages_test_predictions_are_written_as_text(settings, Session, monkeypatch, tmp_path):
    source = tmp_path / "src"
    for k, label in enumerate(CLASSES):
        (source / label).mkdir(parents=True)
        for i, name in enumerate(FILES):
            synthetic_image(["CLL", "FL"][k], i, (32, 32)).save(source / label / name, "PNG")
    groups = tmp_path / "groups.csv"
    with open(groups, "w", newline="") as f:
        csv.writer(f).writerows(
            [
                ("file", "group"),
                *((f"{label}/{name}", f"{GROUP} {i}") for label in CLASSES for i, name in enumerate(FILES)),
            ]
        )
    with Session.begin() as s:
        ingest(s, settings, source, "hostile", groups_csv=groups, user=LOCAL_USER)
        config = RunConfig(
            dataset="hostile",
            image_size=32,
            epochs=1,
            per_class=4,
            batch_size=4,
            weights="none",
            device="cpu",
            split="holdout",
            grouped=False,
        )
        (run,) = runs.create_runs(s, settings, config, user=LOCAL_USER)
        run.status, run.started_at, run.finished_at = RunStatus.succeeded, utcnow(), utcnow()
        dataset = s.scalar(select(Dataset))
        for image in dataset.images:
            true = list(dataset.classes).index(image.label)
            s.add(
                Prediction(
                    run_id=run.id,
                    image_id=image.id,
                    true_label=true,
                    predicted_label=1 - true,
                    probabilities=[0.3, 0.7] if true == 0 else [0.7, 0.3],
                )
            )
        s.add(
            EpochMetric(
                run_id=run.id,
                epoch=1,
                train_loss=0.7,
                train_accuracy=0.5,
                val_loss=0.7,
                val_accuracy=0.5,
                seconds=1.0,
                images_per_second=8.0,
            )
        )
        run.summary = {"test_accuracy": 0.0, "best_epoch": 1, "n_train": 4, "n_val": 2, "n_test": 8}
        run_id = run.id

    downloads: dict[str, bytes] = {}
    real_load = MemoryMediaFileStorage.load_and_get_id

    def load(self, path_or_data, mimetype, kind, filename=None):
        downloads[filename] = path_or_data
        return real_load(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", load)
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("START_WORKER", "0")
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=60).run()
    at.switch_page("pages/runs.py").run()
    assert not at.exception, at.exception

    rows = parsed(downloads[f"run-{run_id}-predictions.csv"].decode())
    assert len(rows) == len(CLASSES) * len(FILES)
    fl = [r for r in rows if r["image"].startswith("'@FL/")]  # the paths that start with the class
    assert len(fl) == len(FILES) and all(r["true"] == "'@FL" for r in fl)
    assert all(re.fullmatch(rf"'{re.escape(GROUP)} \d", r["group"]) for r in rows)
    assert {r["predicted"] for r in rows} == {"CLL", "'@FL"}
    assert all(float(r["raw_p_CLL"]) + float(r["raw_p_@FL"]) == pytest.approx(1) for r in rows)


def test_every_csv_is_written_by_the_one_writer():
    """No page or core module writes CSV itself (the groups manifest, which ingest reads back with its
    names as they are, is no export)."""
    allowed = {ROOT / "core" / "csv_export.py", ROOT / "core" / "data" / "groups.py"}
    files = [*sorted((ROOT / "pages").glob("*.py")), *sorted((ROOT / "core").rglob("*.py")), ROOT / "streamlit_app.py"]
    for path in files:
        if path not in allowed:
            assert not re.search(r"(?<!prediction_log)\.to_csv\(|csv\.writer\(|DictWriter\(", path.read_text()), path


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    from core.jobs import worker

    monkeypatch.setattr(worker, "ensure_worker", lambda settings: True)
