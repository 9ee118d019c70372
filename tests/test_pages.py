"""The pages, driven by Streamlit's AppTest: each renders empty and with data, and the main actions
(upload, launch, read a finished run, predict) reach core and show what core computed.

Data come from core directly: one tiny dataset and one tiny CPU run (32 px, one epoch), trained once
for the module. The background worker is replaced by a recorder, so a launched run stays queued.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.access.accounts import LOCAL_USER
from core.config import Settings, load_settings
from core.data.ingest import ingest
from core.evaluation.metrics import run_report
from core.inference.predict import load_predictor
from core.jobs import estimate, execute, runs, views
from core.store.db import AugmentationPreset, Dataset, EpochMetric, Run, RunStatus
from core.store.engine import make_sessionmaker
from core.store.records import RunSummary
from core.training import presets
from core.training.run_config import RunConfig
from tests.synthetic import synthetic_image, write_dataset

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "streamlit_app.py")
PAGES = [
    "pages/home.py",
    "pages/dataset.py",
    "pages/augmentation.py",
    "pages/train.py",
    "pages/runs.py",
    "pages/predict.py",
]
TITLES = {
    "pages/home.py": "Lymphoma subtype recognition",
    "pages/dataset.py": "Datasets",
    "pages/augmentation.py": "Augmentation",
    "pages/train.py": "Train",
    "pages/runs.py": "Runs",
    "pages/predict.py": "Predict",
}
TINY = dict(image_size=32, epochs=1, per_class=8, batch_size=24, lr=1e-3, weights="none", device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Settings, int]:
    """A dataset 'synthetic' (3 classes x 8 images) and one succeeded tiny run; shared by the module."""
    tmp = tmp_path_factory.mktemp("pages")
    cfg = load_settings({"APP_HOME": str(tmp / "home")})
    Session = make_sessionmaker(cfg.database_url)
    write_dataset(tmp / "src", per_class=8)
    with Session.begin() as s:
        ingest(s, cfg, tmp / "src", "synthetic", user=LOCAL_USER)
    with Session.begin() as s:
        (run,) = runs.create_runs(s, cfg, RunConfig(dataset="synthetic", **TINY), user=LOCAL_USER)
    execute.execute_run(Session, cfg, run.id)
    return cfg, run.id


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    """Record worker starts instead of spawning a training process inside the test run."""
    from core.jobs import worker

    started = []
    monkeypatch.setattr(worker, "ensure_worker", lambda settings: started.append(settings) or True)
    return started


def open_page(monkeypatch, cfg: Settings, page: str) -> AppTest:
    monkeypatch.setenv("APP_HOME", str(cfg.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception, at.exception
    if page != "pages/home.py":
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def charts(at: AppTest) -> list[dict]:
    """The plotly figures on the page, as their JSON specs."""
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def chart_titles(at: AppTest) -> list[str]:
    return [spec["layout"]["title"]["text"] for spec in charts(at)]


def image_captions(at: AppTest) -> list[str]:
    return [c for image in at.get("image") for c in image.captions]


def zip_of(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
        for name, content in (extra or {}).items():
            zf.writestr(name, content)
    return buf.getvalue()


def png_bytes(label: str, index: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image(label, index).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Every page renders


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_an_empty_install(page, settings, monkeypatch):
    at = open_page(monkeypatch, settings, page)
    assert TITLES[page] in at.title[0].value
    assert not at.error
    assert at.info or page in ("pages/augmentation.py", "pages/dataset.py")  # says what to do first
    if page == "pages/dataset.py":
        assert at.file_uploader(key="ds_zip")  # opens on "Add images"
    # The entry script ran too (not only the page file): its sidebar is there.
    assert "Training worker" in " ".join(m.value for m in at.sidebar.markdown)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_with_data(page, trained, monkeypatch):
    cfg, _ = trained
    at = open_page(monkeypatch, cfg, page)
    assert TITLES[page] in at.title[0].value
    assert not at.error, [e.value for e in at.error]


# ---------------------------------------------------------------------------------------------
# Datasets


def test_zip_upload_creates_a_dataset_and_reports_skipped_files(settings, monkeypatch, tmp_path):
    write_dataset(tmp_path / "lymphoma", per_class=3)
    content = zip_of(tmp_path, {"lymphoma/FL/notes.txt": b"not an image"})
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    at.file_uploader(key="ds_zip").set_value(("lymphoma.zip", content, "application/zip"))
    at.run()
    at.button(key="ds_add").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "9 image(s) added" in at.success[0].value
    skipped = at.dataframe[0].value
    assert list(skipped["file"]) == ["FL/notes.txt"] and "not an image" in skipped["reason"][0]
    # The new dataset is shown: counts, chart labelled, one gallery row per class.
    assert {m.label: m.value for m in at.metric}["Images"] == "9"
    assert any("Images per class in 'lymphoma'" in t for t in chart_titles(at))
    Session = make_sessionmaker(settings.database_url)
    with Session() as s:
        dataset = s.scalar(select(Dataset).where(Dataset.name == "lymphoma"))
        assert dataset.source == "upload lymphoma.zip" and len(dataset.images) == 9


@pytest.mark.parametrize(
    "name, kind, message",
    [
        ("nothing.zip", "no entries", "is empty"),
        ("one.zip", "one class", "need at least 2"),
        ("photo.zip", "not a zip", "not a zip file"),
    ],
)
def test_bad_uploads_show_a_clear_message(name, kind, message, settings, monkeypatch, tmp_path):
    (tmp_path / "src").mkdir()
    if kind == "one class":
        write_dataset(tmp_path / "src", per_class=2, classes=("CLL",))
    content = b"definitely not a zip" if kind == "not a zip" else zip_of(tmp_path / "src")
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    at.file_uploader(key="ds_zip").set_value((name, content, "application/zip"))
    at.run()
    at.button(key="ds_add").click().run()
    assert not at.exception
    assert message in at.error[0].value


def test_image_files_by_class_upload(settings, monkeypatch):
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    at.segmented_control(key="ds_source").set_value("Image files by class").run()
    at.text_input(key="ds_name").input("by-class").run()
    for i, label in enumerate(["CLL", "FL", "MCL"]):
        assert at.text_input(key=f"ds_class_{i}").value == label
        at.file_uploader(key=f"ds_files_{i}").set_value(
            [(f"{label}{k}.png", png_bytes(label, k), "image/png") for k in range(2)]
        )
    at.run()
    at.button(key="ds_add").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "6 image(s) added" in at.success[0].value


def test_server_folder_outside_the_import_roots_is_refused(settings, monkeypatch, tmp_path):
    allowed = tmp_path / "allowed"
    write_dataset(allowed / "set", per_class=2)
    write_dataset(tmp_path / "elsewhere", per_class=2)
    monkeypatch.setenv("IMPORT_ROOTS", str(allowed))
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    at.segmented_control(key="ds_source").set_value("Folder on the server").run()
    at.text_input(key="ds_path").input(str(tmp_path / "elsewhere")).run()
    at.button(key="ds_add").click().run()
    assert "outside the folders this server may import from" in at.error[0].value
    at.text_input(key="ds_path").input(str(allowed / "set")).run()
    at.button(key="ds_add").click().run()
    assert not at.error and "6 image(s) added" in at.success[0].value


def test_delete_needs_confirmation(trained, monkeypatch, tmp_path, settings):
    Session = make_sessionmaker(settings.database_url)
    write_dataset(tmp_path / "src", per_class=2)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "doomed", user=LOCAL_USER)
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    assert at.button(key="ds_delete").disabled
    at.checkbox(key="ds_confirm_doomed").check().run()
    at.button(key="ds_delete").click().run()
    assert not at.exception and "Deleted dataset 'doomed'" in at.success[0].value
    with Session() as s:
        assert s.scalar(select(Dataset)) is None


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_augmentation_preview_and_preset(trained, monkeypatch, settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    write_dataset(tmp_path / "src", per_class=2)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "small", user=LOCAL_USER)
    at = open_page(monkeypatch, settings, "pages/augmentation.py")
    assert at.number_input(key="aug_rotate_probability").value == 0.4
    assert at.number_input(key="aug_distortion_magnitude").value == 4
    assert at.number_input(key="aug_zoom_percentage_area").value == 0.9
    at.number_input(key="aug_size").set_value(64).run()
    captions = image_captions(at)
    assert captions[0] == "original" and len(captions) == 1 + 8
    assert all(
        c == "no operation fired" or set(c.lower().split(" + ")) <= {"rotate", "distort", "zoom"} for c in captions[1:]
    )

    at.number_input(key="aug_flip_left_right_probability").set_value(0.5).run()
    at.text_input(key="aug_new_name").input("with flips").run()
    at.button[[b.label for b in at.button].index("Save preset")].click().run()
    assert not at.exception and "Saved preset 'with flips'" in at.success[0].value
    with Session() as s:
        assert presets.get_params(s, "with flips").flip_left_right_probability == 0.5
        assert s.scalar(select(AugmentationPreset.name)) == "with flips"
    saved = at.dataframe[0].value  # the saved presets, in plain words
    assert list(saved.columns) == ["preset", "operations", "saved", "saved by"]
    assert "flip left-right 50%" in saved["operations"][0].lower(), saved["operations"][0]

    # A value Augmentor refuses is a message, not a traceback.
    at.number_input(key="aug_distortion_grid_width").set_value(1).run()
    assert not at.exception


# ---------------------------------------------------------------------------------------------
# Train


def test_launch_queues_a_run_with_the_chosen_settings(trained, monkeypatch, no_worker, settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    write_dataset(tmp_path / "src", per_class=6)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "fresh", user=LOCAL_USER)
    # With a GPU the form starts at the paper's settings (without one, at a quick preset: test_train_page.py).
    monkeypatch.setattr(estimate, "machine_summary", lambda: estimate.MachineSummary(("a GPU",), 2))
    at = open_page(monkeypatch, settings, "pages/train.py")
    assert at.number_input(key="tr_epochs").value == 25 and at.number_input(key="tr_batch_size").value == 24
    assert at.number_input(key="tr_image_size").value == 224 and at.number_input(key="tr_per_class").value == 1200
    at.radio(key="tr_weights").set_value("none")
    at.number_input(key="tr_image_size").set_value(32)
    at.number_input(key="tr_epochs").set_value(1)
    at.number_input(key="tr_per_class").set_value(8)
    at.run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Queued run" in at.success[0].value
    with Session() as s:
        (run,) = s.scalars(select(Run)).all()
        assert run.status == RunStatus.queued
        assert (run.config["image_size"], run.config["epochs"], run.config["per_class"], run.config["weights"]) == (
            32,
            1,
            8,
            "none",
        )
        assert run.config["augmentation"] == RunConfig(dataset="x").augmentation
    assert no_worker, "launching must make sure a worker is running"
    # The Runs page follows it (polling while it is queued or running).
    at.switch_page("pages/runs.py").run()
    assert not at.exception and any("Queued: waiting for the worker" in p.proto.text for p in at.get("progress"))
    # The Train page's queue lists it with a cancel button, which cancels it.
    at.switch_page("pages/train.py").run()
    assert any("Run 1" in m.value for m in at.markdown)
    at.button(key=f"tr_cancel_{run.id}").click().run()
    assert not at.exception and not at.error
    with Session() as s:
        assert s.get(Run, run.id).status == RunStatus.cancelled


def test_generalisation_switches_and_leak_audit_on_the_train_page(monkeypatch, no_worker, settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    write_dataset(tmp_path / "src", per_class=6)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "fresh", user=LOCAL_USER)
    at = open_page(monkeypatch, settings, "pages/train.py")
    assert (
        at.selectbox(key="tr_stain").value,
        at.number_input(key="tr_hed").value,
        at.checkbox(key="tr_tta").value,
        at.number_input(key="tr_tiles").value,
    ) == ("none", 0.0, False, 0)
    at.button(key="tr_audit").click().run()
    assert not at.exception and not at.error
    found = [w.value for w in at.warning if "Leak audit" in w.value] + [
        m.value for m in at.success if "Leak audit" in m.value
    ]
    assert len(found) == 1 and "test vs" in found[0]
    at.radio(key="tr_weights").set_value("none")
    at.selectbox(key="tr_stain").set_value("reinhard")
    at.number_input(key="tr_hed").set_value(0.05)
    at.checkbox(key="tr_tta").check()
    at.number_input(key="tr_tiles").set_value(6)
    at.run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    with Session() as s:
        (run,) = s.scalars(select(Run)).all()
        config = RunConfig.from_dict(run.config)
    assert (config.stain_normalisation, config.hed_jitter, config.tta, config.tiles) == ("reinhard", 0.05, True, 6)


def test_runs_page_shows_the_leak_audit_calibration_intervals_and_colour_yardstick(trained, monkeypatch):
    cfg, run_id = trained
    Session = make_sessionmaker(cfg.database_url)
    with Session() as s:
        summary = dict(s.get(Run, run_id).summary)
    recorded = RunSummary.from_dict(summary)
    assert recorded.leak_audit.n_test == recorded.n_test  # every run audits its split
    at = open_page(monkeypatch, cfg, "pages/runs.py")
    assert not at.exception
    verdicts = [c.value for c in at.caption] + [w.value for w in at.warning]
    assert any("Leak check of this run's split" in t for t in verdicts)
    assert not any("nothing found" in t for t in verdicts)  # one verdict, not "nothing found" and then a count
    assert any("bootstrap interval" in c.value for c in at.caption)
    assert any(f"Run {run_id}: confidence against accuracy on the test part" in t for t in chart_titles(at))
    scaling = next(m for m in at.metric if m.label == "Confidence scaling")  # the temperature, in plain words
    assert "Temperature scaling" in scaling.proto.help
    assert recorded.colour_yardstick.n_test == recorded.n_test
    assert any("Colour-only yardstick on this split" in c.value for c in at.caption)
    # A warning recorded by the audit is shown as one.
    planted = {
        **summary["leak_audit"],
        "exact": 1,
        "verdict": None,
        "warning": "Possible leak: 1 test image exactly equal to a training image.",
    }
    with Session.begin() as s:
        s.get(Run, run_id).summary = {**summary, "leak_audit": planted}
    try:
        at = open_page(monkeypatch, cfg, "pages/runs.py")
        assert any("1 test image is the same as a training image" in w.value for w in at.warning)
    finally:
        with Session.begin() as s:
            s.get(Run, run_id).summary = summary


def test_paper_preset_and_leaky_protocol_need_an_explicit_yes(trained, monkeypatch):
    cfg, _ = trained
    at = open_page(monkeypatch, cfg, "pages/train.py")
    at.button[[b.label for b in at.button].index("Reproduce the paper")].click().run()
    assert at.radio(key="tr_split").value == "paper-leaky"
    assert any("leaks test data" in w.value for w in at.warning)
    assert at.button(key="tr_launch").disabled
    at.checkbox(key="tr_leak_ok").check().run()
    assert not at.button(key="tr_launch").disabled
    at.button[[b.label for b in at.button].index("Paper settings, honest split")].click().run()
    assert at.radio(key="tr_split").value == "holdout" and not any("leaks test data" in w.value for w in at.warning)
    at.button[[b.label for b in at.button].index(presets.UNSEEN_SPECIMENS_CPU)].click().run()
    assert not at.exception
    assert (at.radio(key="tr_split").value, at.number_input(key="tr_folds").value) == ("kfold", 5)
    assert (at.number_input(key="tr_hed").value, at.number_input(key="tr_image_size").value) == (0.05, 64)
    assert at.radio(key="tr_weights").value == "none"  # the preset names its weights; the site default does not apply


# ---------------------------------------------------------------------------------------------
# Runs


def test_finished_run_shows_curves_confusion_matrix_and_table(trained, monkeypatch):
    cfg, run_id = trained
    at = open_page(monkeypatch, cfg, "pages/runs.py")
    assert not at.error
    titles = chart_titles(at)
    assert any(f"Run {run_id}: loss and accuracy per epoch" in t for t in titles)
    assert any(f"Run {run_id}: confusion matrix" in t for t in titles)
    assert all("holdout 80/20" in t for t in titles), titles  # every figure names its protocol

    Session = make_sessionmaker(cfg.database_url)
    with Session() as s:
        report = run_report(s, s.get(Run, run_id))
    (cm,) = [c for c in charts(at) if "confusion" in c["layout"]["title"]["text"]]
    assert np.array(cm["data"][0]["text"]).shape == report.confusion.shape
    table = next(d.value for d in at.dataframe if "Precision" in d.value.columns)
    assert list(table.columns) == ["Class", "Accuracy", "Precision", "Recall", "F1-score", "Support"]
    assert list(table["Class"][:3]) == ["CLL", "FL", "MCL"]
    assert np.allclose(table["F1-score"][:3], [r.f1 for r in report.rows])
    assert table["Accuracy"].iloc[-1] == pytest.approx(report.accuracy)
    labels = [b.label for b in at.get("download_button")]
    assert any("Model file" in str(b.proto.label) for b in at.get("download_button")), labels
    with Session() as s:
        speed = s.get(Run, run_id).summary["images_per_second"]
    assert any(f"Training speed: {views.speed_text(speed)}" in c.value and "CPU run" in c.value for c in at.caption)


def test_failed_run_shows_its_error_and_log(trained, monkeypatch, settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    write_dataset(tmp_path / "src", per_class=4)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "synthetic", user=LOCAL_USER)
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="synthetic", **TINY), user=LOCAL_USER)
        run.status, run.error = RunStatus.failed, "ImageNet weights for DenseNet-201 could not be loaded (offline)."
        run.log_tail = "12:00:00 ERROR run 1 failed\nTraceback: ..."
    at = open_page(monkeypatch, settings, "pages/runs.py")
    assert not at.exception
    assert "This run failed" in at.error[0].value and "could not be loaded" in at.error[0].value
    assert any("run 1 failed" in c.value for c in at.code)


def test_two_runs_are_compared_on_one_figure(trained, monkeypatch):
    cfg, run_id = trained
    Session = make_sessionmaker(cfg.database_url)
    with Session.begin() as s:  # a second run's record, with curves but without training it
        (other,) = runs.create_runs(
            s, cfg, RunConfig(dataset="synthetic", **{**TINY, "seed": 1, "epochs": 2}), user=LOCAL_USER
        )
        other.status = RunStatus.cancelled
        s.add_all(
            EpochMetric(
                run_id=other.id,
                epoch=e,
                train_loss=1.0 / e,
                train_accuracy=0.5,
                val_loss=1.1 / e,
                val_accuracy=0.4 * e,
                seconds=1.0,
                images_per_second=24.0,
            )
            for e in (1, 2)
        )
    try:
        at = open_page(monkeypatch, cfg, "pages/runs.py")
        at.session_state["runs_tab"] = "Compare runs"
        at.run()
        assert not at.exception
        (spec,) = [c for c in charts(at) if "overlaid" in c["layout"]["title"]["text"]]
        assert "holdout 80/20" in spec["layout"]["title"]["text"]
        names = {t["name"] for t in spec["data"]}
        assert f"run {run_id} (validation)" in names and f"run {other.id} (validation)" in names
    finally:
        with Session.begin() as s:
            s.delete(s.get(Run, other.id))


# ---------------------------------------------------------------------------------------------
# Predict


def test_prediction_shows_the_probabilities_core_computes(trained, monkeypatch):
    cfg, run_id = trained
    at = open_page(monkeypatch, cfg, "pages/predict.py")
    image = synthetic_image("FL", 123, (300, 200))
    buf = io.BytesIO()
    image.save(buf, "TIFF")
    at.file_uploader(key="pr_files").set_value(
        [("new.tif", buf.getvalue(), "image/tiff"), ("broken.png", b"not an image", "image/png")]
    )
    at.run()
    assert not at.exception
    assert any("broken.png" in e.value for e in at.error)  # a bad file is named, the rest go on
    table = at.dataframe[0].value
    Session = make_sessionmaker(cfg.database_url)
    with Session() as s:
        predictor = load_predictor(s, cfg, run_id, device="cpu")
    # The page shows the run's calibrated probabilities and its refer band (chosen on validation).
    assert predictor.temperature is not None
    expected = predictor.calibrated(predictor.probabilities([image]))[0]
    threshold = predictor.refer_threshold()
    refer = threshold is None or expected.max() < threshold
    assert list(table["file"]) == ["new.tif"]
    assert np.allclose(table[predictor.classes].to_numpy()[0], expected, atol=1e-5)
    assert table["predicted"][0] == predictor.classes[int(expected.argmax())]
    assert table["verdict"][0] == ("uncertain, refer" if refer else "confident")
    label = "Uncertain, refer" if refer else "Predicted subtype"
    assert {m.label: m.value for m in at.metric}[label] == predictor.classes[int(expected.argmax())]
    assert any("adjusted on the run's" in c.value and "Temperature scaling" in c.help for c in at.caption)

    # A few validation images can promise no target but the run's own: no slider to ask for another.
    assert not at.select_slider and any("support no other target" in c.value for c in at.caption)
    assert any("Class probabilities" in t for t in chart_titles(at))
    # At 32 px the last dense block is 1x1: the page says so instead of drawing an empty overlay.
    assert any("Grad-CAM for" in c for c in image_captions(at)) or any("Grad-CAM for" in i.value for i in at.info)


def test_launch_with_imagenet_weights_that_cannot_be_had_queues_nothing(monkeypatch, no_worker, settings, tmp_path):
    """Offline, the Train page says so at launch in its own words, before any run is queued."""
    import urllib.error

    from core.training import model

    write_dataset(tmp_path / "src", per_class=6)
    with make_sessionmaker(settings.database_url).begin() as s:
        ingest(s, settings, tmp_path / "src", "fresh", user=LOCAL_USER)

    class Offline:
        class IMAGENET1K_V1:  # noqa: N801 - torchvision's enum member name
            @staticmethod
            def get_state_dict(progress: bool = False):
                raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(model, "DenseNet201_Weights", Offline)
    Session = make_sessionmaker(settings.database_url)
    with Session() as s:
        before = len(s.scalars(select(Run)).all())
    at = open_page(monkeypatch, settings, "pages/train.py")
    at.radio(key="tr_weights").set_value("imagenet").run()
    at.button(key="tr_launch").click().run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert "could not be loaded" in error and "A weights file on the server" in error and "No run was queued" in error
    with Session() as s:
        assert len(s.scalars(select(Run)).all()) == before


def test_a_misclassified_test_image_shows_where_the_model_saw_the_wrong_class(trained, monkeypatch):
    cfg, run_id = trained
    at = open_page(monkeypatch, cfg, "pages/runs.py")
    picker = at.selectbox(key=f"runs_cam_{run_id}")
    assert picker.value is None and len(picker.options) > 1  # an untrained tiny model gets some wrong
    picker.set_value(0).run()
    assert not at.exception, at.exception
    assert any("Grad-CAM for" in t for t in chart_titles(at))
    (caption,) = [c for c in at.caption if c.value.startswith("Grad-CAM for")]
    assert "over the whole image" in caption.value and "not at single cells" in caption.value
