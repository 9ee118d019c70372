"""The model outside torch: a run's network exported to ONNX (core/inference/onnx_export.py) and run
by ONNX Runtime, the CPU engine (core/inference/engine.py), gives the torch predictor's probabilities
for plain, stain-normalised and tiled runs; the engine keeps one predictor per model file; the
command line exports a run.

No training: each run is a row made by hand with the model file training would leave, of an
untrained DenseNet-201 at 32 px whose batch-norm layers are randomised."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.__main__ import main
from core.access.limits import disk_usage
from core.config import Settings, load_settings
from core.errors import UserError
from core.inference import engine
from core.inference.model_file import read_model, write_model
from core.inference.onnx_export import ONNX_FILE, export_run
from core.inference.onnx_predict import OnnxPredictor
from core.inference.predict import Predictor, load_predictor, model_sha256
from core.store.engine import make_sessionmaker
from core.store.runs import model_path
from core.training.model import PaperDenseNet
from core.training.run_config import RunConfig
from core.transforms.stain import ReinhardNormaliser
from tests import runs as run_rows
from tests.synthetic import synthetic_array, synthetic_image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["CLL", "FL", "MCL"]
SIZE = 32
STAIN = ReinhardNormaliser(synthetic_array("FL", 0)).to_params()
# The tiled run also averages over the four flips (test-time augmentation), which the graph holds.
VARIANTS = {"plain": {}, "reinhard": {"stain": "reinhard", "stain_params": STAIN}, "tiles": {"tiles": 2, "tta": True}}
# 50 right at 0.9, 10 wrong at 0.5: only the confident 50 can promise 90% (at 95% confidence).
VAL_PROBS = [[0.9, 0.05, 0.05]] * 50 + [[0.5, 0.3, 0.2]] * 10
CALIBRATION = {
    "temperature": 1.7,
    "n_val": 60,
    "refer_target": 0.9,
    "refer_threshold": 0.9,
    "val_probs": VAL_PROBS,
    "val_labels": [0] * 50 + [1] * 10,
}
TOLERANCE = 1e-4


@dataclass
class Runs:
    settings: Settings
    ids: dict[str, int]
    images: list  # an RGB image of each class, 64x48 px (two 32 px tiles each)


def network(seed: int) -> dict[str, torch.Tensor]:
    """An untrained network's weights, with batch-norm statistics and scales away from 0 and 1, so
    that a graph that confused them would not give the same answers."""
    torch.manual_seed(seed)
    model = PaperDenseNet(len(CLASSES))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for value, (low, high) in zip(
                (m.weight.data, m.bias.data, m.running_mean, m.running_var),
                ((0.5, 1.5), (-0.2, 0.2), (-0.2, 0.2), (0.5, 1.5)),
            ):
                value.uniform_(low, high)
    return model.state_dict()


def add_run(settings: Settings, preparation: dict, seed: int) -> int:
    """A succeeded run with a model file, as training leaves one (no training: the tests are about
    what comes after it)."""
    config = RunConfig(dataset="lymphoma", image_size=SIZE, epochs=1, weights="none", device="cpu").to_dict()
    meta = {"preparation": {"image_size": SIZE, **preparation}, "calibration": CALIBRATION}
    return run_rows.add_run(
        settings,
        dataset="lymphoma",
        classes=CLASSES,
        config=config,
        seed=seed,
        experiment=f"e{seed}",
        weights=network(seed),
        meta=meta,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    settings = load_settings({"APP_HOME": str(tmp_path_factory.mktemp("onnx") / "home")})
    ids = {name: add_run(settings, preparation, seed) for seed, (name, preparation) in enumerate(VARIANTS.items())}
    images = [synthetic_image(label, 40) for label in CLASSES]
    return Runs(settings, ids, images)


def session_of(settings: Settings):
    return make_sessionmaker(settings.database_url)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_exported_graph_alone_gives_the_torch_predictors_probabilities(runs, variant):
    settings, run_id = runs.settings, runs.ids[variant]
    with session_of(settings)() as s:
        path = export_run(s, settings, run_id)
        torch_predictor = load_predictor(s, settings, run_id, device="cpu")
    assert path == settings.runs_dir / str(run_id) / ONNX_FILE

    props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert props["classes"] == CLASSES and props["run_id"] == run_id and props["image_size"] == 32
    assert props["preparation"] == torch_predictor.pipeline.to_dict()
    assert props["temperature"] == 1.7 and props["refer_threshold"] == 0.9 and props["refer_target"] == 0.9
    assert props["refer_confidence"] == 0.95 and props["format_version"] == 2

    # Only ONNX Runtime on the pipeline's uint8 samples: the scaling, normalisation and flips are in the graph.
    images = runs.images[:2]
    samples, _ = torch_predictor.pipeline(images)
    graph = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    nchw = np.ascontiguousarray(samples.transpose(0, 3, 1, 2))
    (probs,) = graph.run(None, {"images": nchw})
    expected = torch_predictor.score(nchw)
    assert probs.shape == (len(samples), 3) and np.abs(probs - expected).max() <= TOLERANCE
    assert len(samples) == len(images) * (2 if variant == "tiles" else 1)


def readme_recipe() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using a model outside the app") :]
    return section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]


@pytest.mark.parametrize("variant", ["plain", "tiles"])
def test_the_readmes_recipe_gives_the_apps_probabilities_with_numpy_pillow_and_onnx_runtime(
    runs, variant, tmp_path, monkeypatch
):
    settings, run_id = runs.settings, runs.ids[variant]
    with session_of(settings)() as s:
        export_run(s, settings, run_id, tmp_path)
    (tmp_path / f"run-{run_id}.onnx").rename(tmp_path / "run-7.onnx")
    image = synthetic_image("MCL", 7, (100, 70))  # 3x2 whole tiles of 32 px, of which the tiled run takes 2
    image.save(tmp_path / "slide.tif")
    monkeypatch.chdir(tmp_path)
    recipe: dict = {}
    exec(compile(readme_recipe(), "README.md", "exec"), recipe)
    with session_of(settings)() as s:
        expected = engine.get_predictor(s, settings, run_id, device="cpu").predict([image]).shown[0]
    assert np.abs(recipe["p"] - expected).max() <= TOLERANCE


def test_the_cpu_engine_is_onnx_runtime_and_answers_as_torch_does(runs):
    settings, run_id = runs.settings, runs.ids["reinhard"]
    engine.clear_cache()
    assert engine.engine_name(settings, "cpu") == "onnxruntime" and settings.inference_engine == "auto"
    with session_of(settings)() as s:
        predictor = engine.get_predictor(s, settings, run_id, device="cpu")
    assert isinstance(predictor, OnnxPredictor) and predictor.providers == ["CPUExecutionProvider"]
    assert (predictor.classes, predictor.image_size, predictor.tiles, predictor.tta) == (CLASSES, 32, 0, False)
    assert predictor.normaliser is not None and predictor.run_id == run_id

    in_torch = predictor.torch_predictor()  # the same model file in torch, for Grad-CAM
    assert isinstance(in_torch, Predictor) and predictor.torch_predictor() is in_torch
    expected = in_torch.probabilities(runs.images)
    assert np.abs(predictor.probabilities(runs.images) - expected).max() <= TOLERANCE
    shown = predictor.predict(runs.images)
    assert shown.is_calibrated and np.abs(shown.shown - in_torch.calibrated(expected)).max() <= TOLERANCE
    assert predictor.refer_threshold() == in_torch.refer_threshold() == 0.9
    assert predictor.refer_threshold(0.6) == in_torch.refer_threshold(0.6) == 0.0

    torch_settings = load_settings({"APP_HOME": str(settings.app_home), "INFERENCE_ENGINE": "torch"})
    with session_of(settings)() as s:
        assert isinstance(engine.get_predictor(s, torch_settings, run_id, device="cpu"), Predictor)
        with pytest.raises(UserError, match="INFERENCE_ENGINE='tensorrt' is not an engine"):
            engine.get_predictor(
                s, load_settings({"APP_HOME": str(settings.app_home), "INFERENCE_ENGINE": "tensorrt"}), run_id
            )


def test_one_predictor_per_model_file_and_a_new_one_when_the_file_changes(runs):
    settings, run_id = runs.settings, runs.ids["plain"]
    engine.clear_cache()
    with session_of(settings)() as s:
        first = engine.get_predictor(s, settings, run_id, device="cpu")
        assert engine.get_predictor(s, settings, run_id, device="cpu") is first
    before = first.probabilities(runs.images[:1])

    path = model_path(settings, run_id)
    state, meta = read_model(path)
    state["head.3.bias"] = state["head.3.bias"] + torch.tensor([2.0, 0.0, -2.0])
    write_model(path, state, {k: v for k, v in meta.items() if k not in ("format", "weights_sha256")})
    with session_of(settings)() as s:
        second = engine.get_predictor(s, settings, run_id, device="cpu")
    assert second is not first
    after = second.probabilities(runs.images[:1])
    assert np.abs(after - before).max() > 0.01  # the new weights, not the old export
    assert np.abs(after - second.torch_predictor().probabilities(runs.images[:1])).max() <= TOLERANCE
    exported = onnx.load(str(settings.runs_dir / str(run_id) / ONNX_FILE)).metadata_props
    assert json.loads({p.key: p.value for p in exported}["model_sha256"]) == model_sha256(settings, run_id)


def test_the_export_counts_towards_the_disk_limit(runs):
    settings, run_id = runs.settings, runs.ids["reinhard"]
    cached = settings.runs_dir / str(run_id) / ONNX_FILE
    cached.unlink(missing_ok=True)
    room = disk_usage(settings) + model_path(settings, run_id).stat().st_size // 2  # not room for the export
    full = load_settings({"APP_HOME": str(settings.app_home), "MAX_DISK_GB": str(room / 1e9)})
    with session_of(settings)() as s, pytest.raises(UserError, match="ONNX copy of run .* MAX_DISK_GB"):
        export_run(s, full, run_id)
    assert not cached.exists()


def test_the_command_line_exports_a_run_and_refuses_a_missing_one(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("APP_HOME", str(runs.settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    run_id = runs.ids["tiles"]
    capsys.readouterr()
    assert main(["export", str(run_id), "--format", "onnx", "--out", str(tmp_path / "out")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == tmp_path / "out" / f"run-{run_id}.onnx"
    props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert props["classes"] == CLASSES and props["preparation"]["tiles"] == 2
    assert props["test_time_augmentation"].startswith("inside the graph")

    assert main(["export", "999", "--format", "onnx"]) == 2
    assert "error: No run with id 999" in capsys.readouterr().err


def test_the_predict_page_classifies_with_the_cpu_engine(runs, monkeypatch):
    import io

    from tests.test_pages import open_page

    settings, run_id = runs.settings, runs.ids["plain"]
    engine.clear_cache()
    used = []
    scored = OnnxPredictor.score

    def counting(self, *args, **kwargs):
        used.append(self.run_id)
        return scored(self, *args, **kwargs)

    monkeypatch.setattr(OnnxPredictor, "score", counting)
    at = open_page(monkeypatch, settings, "pages/predict.py")
    at.selectbox(key="pr_run").set_value(run_id).run()
    buf = io.BytesIO()
    runs.images[1].save(buf, "PNG")
    at.file_uploader(key="pr_files").set_value([("fl.png", buf.getvalue(), "image/png")]).run()
    assert not at.exception, at.exception
    assert used and set(used) == {run_id}  # the page's probabilities came from ONNX Runtime
    table = at.dataframe[0].value
    with session_of(settings)() as s:
        expected = load_predictor(s, settings, run_id, device="cpu").predict(runs.images[1:2]).shown[0]
    assert np.abs(table[CLASSES].to_numpy(dtype=float)[0] - expected).max() <= TOLERANCE
