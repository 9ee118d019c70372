"""The model file (core/inference/model_file.py): what a succeeded run keeps, and all a prediction needs.

A run writes one safetensors file: the best epoch's weights and, in its header, the evaluation
pipeline with the fitted stain normaliser, the calibration and where the model came from. A
predictor built from that file alone (no database, no settings) gives back the probabilities the
run stored for its test images; the Runs page, the Predict page and the command line show one
image's probabilities alike, each saying whether they are calibrated.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from core.__main__ import main
from core.access.accounts import LOCAL_USER
from core.config import Settings, load_settings
from core.data.datasets import image_path
from core.data.decoding import load_rgb
from core.data.ingest import ingest
from core.errors import UserError
from core.evaluation.calibration import calibrate
from core.inference.model_file import dataset_fingerprint, read_model
from core.inference.predict import Predictor, load_predictor
from core.inference.probabilities import CALIBRATED
from core.jobs import execute, runs
from core.store.db import Dataset, Image, Prediction, Run, RunStatus
from core.store.engine import engine_of, make_sessionmaker
from core.store.records import RunSummary
from core.store.runs import model_path
from core.training.run_config import RunConfig
from tests.synthetic import synthetic_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("CLL", "FL", "MCL")
# The smallest run that has train, validation and test images: 5 images a class of 64x48 px (two
# tiles of 32 px each), 32 px, one epoch of 12 augmented images.
TINY = dict(
    image_size=32, epochs=1, per_class=4, batch_size=12, lr=1e-3, weights="none", device="cpu", val_fraction=0.25
)
VARIANTS = {"plain": {}, "reinhard": {"stain_normalisation": "reinhard"}, "tiles": {"tiles": 2}}
KEEPS_CHECKPOINTS = "tiles"  # that run is trained with KEEP_CHECKPOINTS=1


def write_source(root: Path, per_class: int = 5) -> list[tuple[str, str]]:
    """root/CLASS/class-NN.tif (names unique across classes); the (sha256, label) of each file."""
    images = []
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / label / f"{label.lower()}-{i:02d}.tif"
            synthetic_image(label, i).save(path)
            images.append((hashlib.sha256(path.read_bytes()).hexdigest(), label))
    return images


@dataclass
class Trained:
    settings: Settings
    run_id: int
    model: Path  # its model file
    stored: list[tuple[Path, list[float]]]  # each test image's file and its stored probabilities
    fingerprint: str  # of the dataset, computed from the source files


def train(tmp: Path, keep_checkpoints: bool = False, **config) -> Trained:
    settings = load_settings({"APP_HOME": str(tmp / "home"), "KEEP_CHECKPOINTS": "1" if keep_checkpoints else "0"})
    Session = make_sessionmaker(settings.database_url)
    images = write_source(tmp / "src")
    with Session.begin() as s:
        ingest(s, settings, tmp / "src", "lymphoma", user=LOCAL_USER)
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, RunConfig(dataset="lymphoma", **{**TINY, **config}), user=LOCAL_USER)
    execute.execute_run(Session, settings, run.id)
    with Session() as s:
        assert s.get(Run, run.id).status == RunStatus.succeeded, s.get(Run, run.id).error
        rows = s.execute(
            select(Prediction, Image)
            .join(Image, Image.id == Prediction.image_id)
            .where(Prediction.run_id == run.id)
            .order_by(Prediction.id)
        ).all()
        stored = [(image_path(settings, image), list(pred.probabilities)) for pred, image in rows]
    engine_of(Session).dispose()
    return Trained(settings, run.id, model_path(settings, run.id), stored, dataset_fingerprint(images))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Trained]:
    """One tiny run of each variant, each in an APP_HOME of its own."""
    return {
        name: train(tmp_path_factory.mktemp(name), keep_checkpoints=name == KEEPS_CHECKPOINTS, **config)
        for name, config in VARIANTS.items()
    }


def test_a_succeeded_run_keeps_one_model_file_of_weights_only_describing_itself(trained):
    run = trained["plain"]
    assert sorted(p.name for p in run.model.parent.iterdir()) == ["model.safetensors", "train.log"]
    # The whole modified DenseNet-201 in fp32: its size does not depend on the image size.
    size = run.model.stat().st_size
    assert 70e6 < size <= 85e6, size
    state, meta = read_model(run.model)
    assert {v.dtype for v in state.values()} <= {torch.float32, torch.int64}
    assert "head.3.weight" in state and not any("exp_avg" in k or "optim" in k for k in state)
    assert meta["classes"] == list(CLASSES) and meta["run_id"] == run.run_id
    assert meta["preparation"] == {"image_size": 32, "tiles": 0, "stain": "none", "stain_params": None, "tta": False}
    calibration = meta["calibration"]
    assert calibration["temperature"] > 0 and calibration["refer_target"] == 0.9 and "refer_threshold" in calibration
    assert calibration["n_val"] == len(calibration["val_labels"]) == len(calibration["val_probs"]) >= 1
    # The launch records the version it trained on (the latest then: 1).
    assert RunConfig.from_dict(meta["config"]) == RunConfig(
        dataset="lymphoma", grouped=False, dataset_version=1, **TINY
    )
    assert meta["test_metrics"]["n_test"] == len(run.stored) and "holdout" in meta["test_metrics"]["protocol"]
    assert meta["dataset"] == {"name": "lymphoma", "fingerprint": run.fingerprint, "n_images": 15, "version": 1}


def test_keep_checkpoints_keeps_the_resumable_checkpoint_beside_the_model_file(trained):
    run = trained[KEEPS_CHECKPOINTS]
    assert sorted(p.name for p in run.model.parent.iterdir()) == ["last.pt", "model.safetensors", "train.log"]
    checkpoint = torch.load(run.model.parent / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and "optimizer" in checkpoint and checkpoint["run_id"] == run.run_id


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_model_file_alone_gives_back_the_stored_test_probabilities(variant, trained):
    run = trained[variant]
    home = run.settings.app_home
    for name in ("app.db", "app.db-wal", "app.db-shm"):
        (home / name).unlink(missing_ok=True)
    shutil.rmtree(home / "cache", ignore_errors=True)
    assert run.stored and not (home / "app.db").exists()

    predictor = Predictor.from_file(run.model, device="cpu")
    probs = predictor.probabilities([load_rgb(path) for path, _ in run.stored])
    assert np.allclose(probs, [p for _, p in run.stored], atol=1e-5, rtol=0)
    assert predictor.tiles == VARIANTS[variant].get("tiles", 0)
    params = predictor.pipeline.stain_params
    if variant == "reinhard":  # the fitted normaliser came with the file, not from a reference image
        assert params["method"] == "reinhard" and len(params["mean"]) == len(params["std"]) == 3
    else:
        assert params is None and predictor.normaliser is None


def test_a_run_from_before_model_files_is_refused_saying_so(settings, Session, tmp_path):
    write_source(tmp_path / "src", per_class=2)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "old", user=LOCAL_USER)
        run = Run(
            dataset_id=s.scalar(select(Dataset.id)), experiment="e", config={}, seed=0, status=RunStatus.succeeded
        )
        s.add(run)
        s.flush()
        run_id = run.id
    (settings.runs_dir / str(run_id)).mkdir(parents=True)
    (settings.runs_dir / str(run_id) / "best.pt").write_bytes(b"a checkpoint of an earlier version")
    with Session() as s, pytest.raises(UserError, match=f"Run {run_id} predates model files"):
        load_predictor(s, settings, run_id, device="cpu")


# ---------------------------------------------------------------------------------------------
# One image, three displays


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Trained:
    """A run that has barely learnt (lr 1e-7), so that its gallery of misclassified images is not empty."""
    return train(tmp_path_factory.mktemp("shown"), lr=1e-7)


def page(monkeypatch, settings: Settings, name: str) -> AppTest:
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page(name).run()
    assert not at.exception, at.exception
    return at


def shown_in_gallery(at: AppTest, name: str) -> tuple[str, dict[str, float]]:
    """The label and the class probabilities the Runs page's gallery shows under image `name`."""
    for caption in (c.value.replace("\\", "").replace("\u2060", "") for c in at.caption):  # md_text's escapes
        if caption.startswith(name) and ": " in caption:
            label, _, values = caption.split("  \n", 1)[1].partition(": ")
            return label, {c: float(v.rstrip("%")) / 100 for c, v in (item.split(" ") for item in values.split(" · "))}
    raise AssertionError(f"no gallery caption for {name}: {[c.value for c in at.caption]}")


def test_the_runs_gallery_the_predict_page_and_the_cli_show_one_image_alike(untrained, monkeypatch, capsys):
    run = untrained
    Session = make_sessionmaker(run.settings.database_url)
    with Session() as s:
        calibration = RunSummary.from_dict(s.get(Run, run.run_id).summary).calibration
        pred, image = s.execute(
            select(Prediction, Image)
            .join(Image, Image.id == Prediction.image_id)
            .where(Prediction.run_id == run.run_id, Prediction.true_label != Prediction.predicted_label)
            .order_by(Prediction.id)
        ).first()
        path, name = image_path(run.settings, image), Path(image.original_name).name
    assert calibration.temperature is not None  # the run has a validation part
    expected = calibrate(np.asarray([pred.probabilities]), calibration.temperature)[0]

    label, gallery = shown_in_gallery(page(monkeypatch, run.settings, "pages/runs.py"), name)
    assert label == CALIBRATED
    assert np.allclose([gallery[c] for c in CLASSES], expected, atol=0.0005 + 1e-9)  # shown to 0.1%

    at = page(monkeypatch, run.settings, "pages/predict.py")
    at.file_uploader(key="pr_files").set_value([(name, path.read_bytes(), "image/tiff")]).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table["probabilities"]) == [CALIBRATED]
    assert np.allclose(table[list(CLASSES)].to_numpy()[0], expected, atol=1e-5)
    assert any(CALIBRATED in str(m.proto.delta) for m in at.metric)

    capsys.readouterr()
    for flags, kind, values in (([], "calibrated", expected), (["--raw"], "raw", pred.probabilities)):
        assert main(["predict", "--run", str(run.run_id), *flags, str(path)]) == 0
        (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
        assert row["probability_kind"] == kind
        assert np.allclose([float(row[c]) for c in CLASSES], values, atol=1e-4)  # printed to 4 decimals
