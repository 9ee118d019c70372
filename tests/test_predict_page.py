"""The Predict page, driven by Streamlit's AppTest: the approved model by default, each classification
logged and listed in History, the refer band said in plain words with what it rests on, a batch's
referred images counted apart, the heat map over the image with its colour scale, and a way to
clear the uploads.

No training: each run is a row made by hand with a model file of an untrained DenseNet-201 at 64 px
(the weights made once for the module), whose calibration record is written to order: 20
validation images from which no threshold can promise 90% (ten right of ten at 0.95 bounds the
accuracy at about 63% with 95% confidence), so that every image is referred. The torch engine (INFERENCE_ENGINE=torch) keeps the tests from
exporting DenseNet-201 to ONNX; the engine itself is tested on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from streamlit.proto.Metric_pb2 import Metric as MetricProto
from streamlit.testing.v1 import AppTest

from core.access.accounts import EDITOR, User
from core.config import Settings, load_settings
from core.inference import approval
from core.store.db import PredictionLog
from core.store.engine import make_sessionmaker
from core.store.runs import model_path
from core.training.model import PaperDenseNet
from core.training.run_config import RunConfig
from tests import runs as run_rows
from tests.synthetic import synthetic_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("CLL", "FL", "MCL")
SIZE = 64
# 20 validation images: ten right at 0.95, ten wrong at 0.6, so a 90% target needs confidence >= 0.95.
VAL_PROBS = [[0.95, 0.03, 0.02]] * 10 + [[0.6, 0.3, 0.1]] * 10
VAL_LABELS = [0] * 10 + [1] * 10
CALIBRATION = {
    "temperature": 1.0,
    "n_val": 20,
    "val_ece_before": 0.31,
    "val_ece_after": 0.12,
    "refer_target": 0.9,
    "refer_threshold": 0.95,
    "val_probs": VAL_PROBS,
    "val_labels": VAL_LABELS,
}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return PaperDenseNet(len(CLASSES)).state_dict()


@pytest.fixture(scope="module")
def home(tmp_path_factory, weights) -> Settings:
    """One install for the module: an approved run and a newer one. Shared, so that the model is
    loaded (and its Grad-CAM copy made) once for all the tests, as a server keeps it for every session."""
    folder = tmp_path_factory.mktemp("predict") / "home"
    settings = load_settings({"APP_HOME": str(folder), "INFERENCE_ENGINE": "torch"})
    approved = add_run(settings, weights)
    add_run(settings, weights)
    with make_sessionmaker(settings.database_url).begin() as s:
        approval.approve(s, settings, approved, User("ana", EDITOR), "checked on the March slides")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("APP_HOME", str(folder))
        env.setenv("INFERENCE_ENGINE", "torch")
        env.delenv("DATABASE_URL", raising=False)
        yield settings


def approved_run(settings: Settings) -> int:
    with make_sessionmaker(settings.database_url)() as s:
        return approval.approved_run(s).run_id


def add_run(settings: Settings, weights, dataset: str = "lymphoma", calibration: dict | None = None) -> int:
    """A succeeded run of `dataset` (made when missing) with its own model file, as training leaves
    one; its calibration record `calibration` (default CALIBRATION)."""
    config = RunConfig(dataset=dataset, image_size=SIZE, epochs=1, weights="none", device="cpu").to_dict()
    meta = {"preparation": {"image_size": SIZE}, "calibration": calibration or CALIBRATION}
    return run_rows.add_run(settings, dataset=dataset, classes=CLASSES, config=config, weights=weights, meta=meta)


def open_predict() -> AppTest:
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180).run()
    at.switch_page("pages/predict.py").run()
    assert not at.exception, at.exception
    return at


def upload(at: AppTest, *labels: str, key: str = "pr_files") -> AppTest:
    files = []
    for i, label in enumerate(labels):
        buf = io.BytesIO()
        synthetic_image(label, 200 + i, (160, 120)).save(buf, "PNG")
        files.append((f"{label.lower()}-{i}.png", buf.getvalue(), "image/png"))
    at.file_uploader(key=key).set_value(files).run()
    assert not at.exception, at.exception
    return at


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_the_page_defaults_to_the_approved_model_and_logs_each_classification(home, monkeypatch):
    approved, Session = approved_run(home), make_sessionmaker(home.database_url)
    at = open_predict()
    picker = at.selectbox(key="pr_run")
    assert picker.value == approved and picker.options[0].startswith(f"Run {approved + 1} ")  # not the newest
    assert any(o.endswith("approved") and o.startswith(f"Run {approved} ") for o in picker.options)
    assert any("approved" in c.value and "ana" in c.value for c in at.caption)

    upload(at, "CLL", "FL", "MCL")
    # Loading the model is shown in steps, ending in how long it took.
    (status,) = [e for e in at.get("status") if "Classified 3 image(s) in " in e.proto.label]
    with Session() as s:
        rows = list(s.scalars(select(PredictionLog).order_by(PredictionLog.id)))[-3:]
    sha = hashlib.sha256(model_path(home, approved).read_bytes()).hexdigest()
    assert [(r.run_id, r.model_sha256, r.user, r.source) for r in rows] == [(approved, sha, "local", "page")] * 3
    assert [r.image_name for r in rows] == ["cll-0.png", "fl-1.png", "mcl-2.png"]

    # The History tab lists them, newest first, and filters by predicted class.
    history = at.dataframe[-1].value
    assert sorted(history["file"][:3]) == ["cll-0.png", "fl-1.png", "mcl-2.png"]
    assert set(history["model"]) == {f"run {approved}"} and set(history["user"]) == {"local"}
    assert set(history["model file (sha256)"]) == {sha[:12]}
    one = rows[0].predicted
    at.selectbox(key="pr_h_class").set_value(one).run()
    assert set(at.dataframe[-1].value["predicted"]) == {one}
    csv = at.get("download_button")[-1].proto
    assert csv.label == "Log (.csv)"

    # Another browser session is served the model this one loaded: no second load.
    from core.inference.predict import Predictor

    monkeypatch.setattr(Predictor, "from_file", lambda *a, **k: pytest.fail("the model was loaded again"))
    other = upload(open_predict(), "FL")
    assert list(other.dataframe[0].value["file"]) == ["fl-0.png"]


def test_a_batch_referred_whole_is_counted_apart_and_the_band_said_in_plain_words(home):
    at = upload(open_predict(), "CLL", "FL", "MCL")
    shown = metrics(at)
    assert shown["Referred"] == "3"
    assert [shown[f"Confident {c}"] for c in CLASSES] == ["0", "0", "0"]
    assert not [label for label in shown if label.startswith("Predicted ")]
    # What the threshold rests on, and a warning that 20 images make it rough.
    assert any("rests on only 20 validation images" in w.value and "rough" in w.value for w in at.warning)
    (band,) = [c for c in at.caption if "Confidence adjusted" in c.value]
    # Ten of ten right at 0.95 is no promise of 90% (the lower bound is about 63%): no threshold can
    # claim it, so every prediction is referred, and the slider offers no lower target to make some
    # "confident" (the raw rate, 10 of 10, once did).
    assert "adjusted on the run's 20 validation images" in band.value
    assert "No confidence threshold can promise 90% accuracy from the 20 validation images" in band.value
    assert not at.select_slider  # no other target to offer: the page says so instead of a one-stop slider
    assert any("its validation images support no other target" in c.value for c in at.caption)
    page_text = " ".join(e.value for e in [*at.caption, *at.warning, *at.info, *at.markdown])
    assert "ECE" not in page_text and "T = " not in page_text and "temperature" not in page_text.lower()
    assert "T = 1," in band.help and "ECE" in band.help  # the terms are in the tooltip
    # The verdict's probability is a plain figure, not a badge with an arrow.
    (referred,) = [m for m in at.metric if m.label == "Uncertain, refer"]
    assert "most likely" in referred.proto.delta and referred.proto.direction == MetricProto.MetricDirection.NONE


def test_moving_the_slider_lowers_the_threshold_only_as_far_as_the_validation_images_support(home, weights):
    """A run whose 200 validation images support several targets: 100 right at a confidence above
    every uploaded image's, 70 (60 right, 10 wrong) at the uploads' median, 30 wrong below them all.
    At the run's 95% every upload is referred; moved to 85%, those at or above the median become
    confident, each verdict the one calibration.refer_band gives, and the page says the log holds 95%."""
    from core.evaluation import calibration as cal_module
    from core.inference import service

    run_id = add_run(home, weights)
    images = [
        service.ImageInput(f"{c.lower()}-{i}.png", png(synthetic_image(c, 200 + i, (160, 120))))
        for i, c in enumerate(("CLL", "FL", "MCL", "CLL", "FL", "MCL"))
    ]
    answers = service.classify(
        make_sessionmaker(home.database_url), home, User("t", EDITOR), images, run_id=run_id, source="cli", log=False
    )
    tops = sorted(a.confidence for a in answers)
    high, middle = min(0.999, tops[-1] + 0.01), tops[len(tops) // 2]

    def val(top: float, label: int) -> list[float]:  # a validation row whose top class is `label` at `top`
        rest = (1 - top) / 2
        return [top if k == label else rest for k in range(3)]

    probs = [val(high, 0)] * 100 + [val(middle, 0)] * 60 + [val(middle, 1)] * 10 + [val(1 / 3 + 1e-3, 2)] * 30
    labels = [0] * 160 + [0] * 10 + [1] * 30
    record = {**CALIBRATION, "n_val": 200, "refer_target": 0.95, "val_probs": probs, "val_labels": labels}
    tuned = add_run(home, weights, calibration=record)
    at = open_predict()
    at.selectbox(key="pr_run").set_value(tuned).run()
    at = upload(at, "CLL", "FL", "MCL", "CLL", "FL", "MCL")
    slider = at.select_slider(key=f"pr_target_{tuned}")
    assert slider.value == 0.95 and slider.options == ["70%", "75%", "80%", "85%", "90%", "95%"]  # not 99%
    assert metrics(at)["Referred"] == "6"
    slider.set_value(0.85).run()
    band = cal_module.refer_band(np.asarray(probs), labels, 0.85)
    assert band.threshold == pytest.approx(middle) and band.bound >= 0.85
    table = at.dataframe[0].value
    expected = [
        "confident" if max(p for c, p in row.items() if c in CLASSES) >= band.threshold else "uncertain, refer"
        for row in table[list(CLASSES)].to_dict("records")
    ]
    assert list(table["verdict"]) == expected and 0 < expected.count("confident") < 6
    assert metrics(at)["Referred"] == str(expected.count("uncertain, refer"))
    assert any("logged at 95%" in i.value and "verdicts below are at 85%" in i.value for i in at.info)
    assert any(f"{band.threshold:.1%} are marked" in c.value and "at least 85%" in c.value for c in at.caption)


def test_the_heat_map_lies_over_the_image_with_a_colour_scale_on_a_fine_enough_layer(home):
    run_id = approved_run(home)
    at = upload(open_predict(), "FL")
    (spec,) = [json.loads(c.proto.spec) for c in at.get("plotly_chart") if "Grad-CAM" in c.proto.spec]
    image, heat = spec["data"]
    assert image["type"] == "image" and image["source"].startswith("data:image/jpeg;base64,")
    assert heat["type"] == "heatmap" and heat["opacity"] == pytest.approx(0.45)
    assert "raised the class score" in heat["colorbar"]["title"]["text"].replace("<br>", " ")
    # At 64 px the last dense block is 2x2; dense block 2 gives 8x8 cells, and the page says which.
    z = heat["z"]  # plotly sends an array as its shape and bytes
    assert (z["shape"] if isinstance(z, dict) else f"{len(z)}, {len(z[0])}") == "8, 8"
    assert "dense block 2" in spec["layout"]["title"]["text"] and f"run {run_id}" in spec["layout"]["title"]["text"]
    (caption,) = [c for c in at.caption if c.value.startswith("Grad-CAM for")]
    assert "8×8 cells" in caption.value and "dense block 2" in caption.help
    assert not [i for i in at.info if "cannot point" in i.value]  # 8x8 is fine enough


def test_clear_empties_the_uploader_and_forgets_the_batch(home, monkeypatch):
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager

    removed, remove = [], MemoryUploadedFileManager.remove_file
    monkeypatch.setattr(
        MemoryUploadedFileManager,
        "remove_file",
        lambda self, session_id, file_id: removed.append(file_id) or remove(self, session_id, file_id),
    )
    at = upload(open_predict(), "CLL", "MCL")
    held = [f.file_id for f in at.file_uploader(key="pr_files").value]
    assert "pr_results" in at.session_state and len(at.dataframe) == 2  # the results and History
    at.button(key="pr_clear").click().run()
    assert not at.exception, at.exception
    assert len(held) == 2 and sorted(removed) == sorted(held)  # out of the server's memory
    assert "pr_results" not in at.session_state
    assert not at.file_uploader(key="pr_files_1").value and len(at.dataframe) == 1  # History only
    upload(at, "FL", key="pr_files_1")  # a new batch of one, in the new uploader
    assert list(at.dataframe[0].value["file"]) == ["fl-0.png"]
