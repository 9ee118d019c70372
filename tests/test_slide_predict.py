"""A whole slide predicted tile by tile at the model's scale (core/slides/predict.py), its outputs
(core/slides/outputs.py) and `python -m core predict-slide`.

The model that tells the two textures apart is a DenseNet-201 whose backbone is untrained and whose
head is fitted in closed form (the two classes' mean features, 40 synthetic images): a real model
file through the real predictor, made in a second or two, where training the network on this CPU
takes tens of seconds an epoch. The other runs reuse its weights at another scale, or with none.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.__main__ import main
from core.config import Settings, load_settings
from core.errors import UserError
from core.evaluation.calibration import recorded_band
from core.inference import prediction_log
from core.inference.predict import Predictor
from core.slides import outputs
from core.slides.predict import SlideCancelled, predict_slide, slide_scale
from core.slides.scale import ModelScale, scale_meta
from core.store.engine import make_sessionmaker
from core.store.records import CalibrationRecord
from core.training.model import PaperDenseNet
from core.training.run_config import RunConfig
from core.transforms.pipelines import EvalPipeline
from tests import runs as run_rows
from tests.slides import Region, class_texture, two_region_slide, write_slide
from tests.synthetic import synthetic_image

TWO = ("CLL", "FL")
SCALE = ModelScale(tile_px=32, mpp=1.0)  # 128 level-0 pixels at the slides' 0.25 um/px
COARSE = ModelScale(tile_px=32, mpp=2.0)  # 256: few tiles, where what they show does not matter
# The run's validation images: a hundred right at 0.9, twenty wrong at 0.6, so that a 90% target
# lets through only what is at least 0.9 confident.
CALIBRATION = {
    "temperature": 1.0,
    "n_val": 120,
    "val_ece_before": 0.1,
    "val_ece_after": 0.1,
    "refer_target": 0.9,
    "refer_threshold": 0.9,
    "val_probs": [[0.9, 0.1]] * 100 + [[0.6, 0.4]] * 20,
    "val_labels": [0] * 100 + [1] * 20,
}


def add_run(
    settings: Settings, state: dict, classes: tuple[str, ...], scale: ModelScale | None, calibration: dict | None = None
) -> int:
    """A succeeded run with a model file of `state`, whole images at 32 px, recording `scale`."""
    config = RunConfig(dataset="slides", image_size=32, epochs=1, weights="none", device="cpu").to_dict()
    meta = {"preparation": {"image_size": 32}}
    if scale is not None:
        meta["scale"] = scale_meta(scale.tile_px, scale.mpp)
    if calibration is not None:
        meta["calibration"] = calibration
    return run_rows.add_run(settings, dataset="slides", classes=classes, config=config, weights=state, meta=meta)


def texture_weights() -> dict[str, torch.Tensor]:
    """DenseNet-201 with an untrained backbone and a head that tells CLL from FL: the pooled features
    of 12 synthetic images of each are projected on the difference of the classes' means."""
    torch.manual_seed(0)
    model = PaperDenseNet(len(TWO)).eval()
    probe = Predictor(model, list(TWO), EvalPipeline(image_size=32), torch.device("cpu"))
    seen: list[torch.Tensor] = []
    hook = model.head[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    images = [synthetic_image(label, 1000 + i, (64, 64)) for label in TWO for i in range(12)]
    probe.probabilities(images)  # the features as a predictor computes them, its pipeline included
    hook.remove()
    features = torch.cat(seen).double()
    a, b = features[:12].mean(0), features[12:].mean(0)
    w = b - a  # positive towards FL
    bias = -float(w @ (a + b)) / 2
    margin = float((features @ w + bias).abs().median())
    state = model.state_dict()
    first, last = torch.zeros_like(state["head.0.weight"]), torch.zeros_like(state["head.3.weight"])
    first[0], first[1] = w / margin, -w / margin  # hidden 0: how far towards FL, hidden 1: towards CLL
    bias0 = torch.zeros_like(state["head.0.bias"])
    bias0[0], bias0[1] = bias / margin, -bias / margin
    last[1, 0], last[0, 1] = 6.0, 6.0  # a median image at a logit difference of 6: 99.8% confident
    state.update(
        {
            "head.0.weight": first.float(),
            "head.0.bias": bias0.float(),
            "head.3.weight": last,
            "head.3.bias": torch.zeros_like(state["head.3.bias"]),
        }
    )
    return state


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for this module: its inputs are 32 px tiles, on which a second OpenMP thread
    mostly waits, and on a busy 2-core machine it ran them 5-10 times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def home(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("slide-predict")
    settings = load_settings({"APP_HOME": str(folder / "home"), "INFERENCE_ENGINE": "torch"})
    weights = texture_weights()
    runs = {
        "textures": add_run(settings, weights, TWO, SCALE, CALIBRATION),
        "coarse": add_run(settings, weights, TWO, COARSE),  # no calibration: raw probabilities
        "fields": add_run(settings, weights, TWO, None),
    }
    # The blocks lie on the 128 px grid (5 x 4 tiles each), so each tissue tile shows one texture: a
    # tile half glass is a question for a model trained with glass around its tissue, not for this head.
    two, left, right = two_region_slide(folder / "two.tif", width=2560, height=1024)
    with pytest.MonkeyPatch.context() as env:  # for the command line, which reads its settings from there
        env.setenv("APP_HOME", str(settings.app_home))
        env.setenv("INFERENCE_ENGINE", "torch")
        env.delenv("DATABASE_URL", raising=False)
        yield settings, runs, (two, left, right), folder


def predictor(settings: Settings, run_id: int):
    from core.inference import engine

    with make_sessionmaker(settings.database_url)() as s:
        return engine.get_predictor(s, settings, run_id, "cpu")


def inside(tile_x: int, tile_y: int, side: float, region: Region) -> bool:
    """Whether the tile's centre lies in the region."""
    cx, cy = tile_x + side / 2, tile_y + side / 2
    return region.x <= cx < region.x + region.width and region.y <= cy < region.y + region.height


def test_each_half_of_a_two_texture_slide_is_its_own_class_and_glass_gives_no_tile(home):
    settings, runs, (path, left, right), _ = home
    model = predictor(settings, runs["textures"])
    calls: list[tuple[int, int]] = []
    pred = predict_slide(
        model,
        path,
        scale=slide_scale(model),
        settings=settings,
        batch=16,
        progress=lambda done, total: calls.append((done, total)),
    )
    side = pred.tiling.step_x
    assert side == 128 and pred.classes == TWO
    assert pred.tile_probabilities.shape == (pred.n_tiles, 2) and pred.tile_probabilities.dtype == np.float32
    on_left = [k for k, t in enumerate(pred.tiling.tiles) if inside(t.x, t.y, side, left)]
    on_right = [k for k, t in enumerate(pred.tiling.tiles) if inside(t.x, t.y, side, right)]
    assert len(on_left) == len(on_right) == 20
    assert len(on_left) + len(on_right) == pred.n_tiles  # no tile from the glass between or around them
    winners = pred.tile_predicted
    assert np.mean(winners[on_left] == 0) >= 0.9 and np.mean(winners[on_right] == 1) >= 0.9
    # Half and half: the mean is near 0.5, below the run's band, so the slide is referred.
    band = recorded_band(CalibrationRecord.from_dict(CALIBRATION))
    assert pred.kind == "calibrated" and pred.threshold == band.threshold == pytest.approx(0.9)
    assert pred.refer is True and max(pred.probabilities.values()) < 0.75
    assert 0.3 < pred.tissue_share["CLL"] < 0.7 and sum(pred.tissue_share.values()) == pytest.approx(1)
    # The gallery's tiles of each class lie in its texture.
    assert all(inside(t.x, t.y, side, left) for t in pred.top_tiles["CLL"])
    assert all(inside(t.x, t.y, side, right) for t in pred.top_tiles["FL"])
    # Progress once the tiles are counted, then after each batch of 16, ending at every tile.
    assert calls[0] == (0, pred.n_tiles) and calls[-1] == (pred.n_tiles, pred.n_tiles)
    assert len(calls) == 1 + -(-pred.n_tiles // 16)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and pred.tiles_per_second > 0
    # The heat map: each tile's class and probability in its grid cell, nothing elsewhere.
    heat = outputs.heat_map(pred)
    assert heat.predicted.shape == (pred.tiling.rows, pred.tiling.columns)
    assert np.isfinite(heat.predicted).sum() == pred.n_tiles
    for k, t in enumerate(pred.tiling.tiles):
        assert heat.predicted[t.row, t.col] == winners[k]
        assert heat.probability[t.row, t.col] == pytest.approx(pred.tile_probabilities[k, winners[k]])
    t0 = pred.tiling.tiles[0]
    assert heat.box(t0.row, t0.col) == pytest.approx(pred.tiling.thumbnail_box(t0), abs=0.05)


def test_the_command_line_writes_csv_and_geojson_for_qupath_and_logs_the_slide(home, tmp_path, capsys):
    settings, runs, _, folder = home
    pure = write_slide(folder / "pure-cll.tif", 1024, 768, [Region(256, 256, 512, 384, class_texture("CLL"))])
    out = tmp_path / "out"
    assert (
        main(["predict-slide", "--run", str(runs["textures"]), "--out", str(out), "--log", "--user", "ana", str(pure)])
        == 0
    )
    printed = capsys.readouterr()
    assert printed.out.startswith("pure-cll.tif: CLL\n") and "uncertain" not in printed.out
    assert "tiles/s" in printed.out and "tiles:" in printed.err  # the progress bar, on stderr
    summary = json.loads((out / "pure-cll.summary.json").read_text())
    n = summary["tiles"]["kept"]
    assert n == 12 and summary["predicted"] == "CLL" and summary["refer"] is False
    assert summary["scale"] == {"tile_px": 32, "mpp": 1.0}

    with open(out / "pure-cll.tiles.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and list(rows[0]) == ["x", "y", "width", "height", "predicted", "CLL", "FL", "pen", "blurry"]
    assert sum(r["predicted"] == "CLL" for r in rows) >= 0.9 * n

    collection = json.loads((out / "pure-cll.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == n
    for feature, row in zip(collection["features"], rows):
        ring = feature["geometry"]["coordinates"][0]
        x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
        assert feature["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        assert ring == [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]  # level 0: 128 px a tile
        assert w == h == 128 and 256 <= x < 768 and 256 <= y < 640
        props = feature["properties"]
        assert props["objectType"] == "tile" and props["classification"]["name"] == row["predicted"]
        assert len(props["classification"]["color"]) == 3
        assert props["measurements"]["CLL probability"] == pytest.approx(float(row["CLL"]))

    with make_sessionmaker(settings.database_url)() as s:
        (logged,) = [r for r in prediction_log.list_predictions(s) if r.image_name == "pure-cll.tif"]
    assert logged.source == "cli" and logged.user == "ana" and logged.predicted == "CLL" and logged.refer is False
    assert logged.probabilities == pytest.approx(summary["probabilities"])
    assert (logged.width, logged.height, logged.size_bytes) == (1024, 768, pure.stat().st_size)
    assert logged.threshold == pytest.approx(0.9) and logged.refer_target == 0.9


def test_the_command_line_says_in_one_line_what_is_wrong(home, tmp_path, capsys):
    settings, runs, (two, _, _), folder = home
    no_mpp = write_slide(tmp_path / "no-mpp.tif", 1024, 1024, [Region(0, 0, 512, 512, class_texture("FL"))], mpp=None)
    field = tmp_path / "field.png"
    synthetic_image("FL", 1).save(field)
    cases = [
        ([str(runs["coarse"]), str(no_mpp)], "no-mpp.tif has no microns per pixel; give it with --mpp"),
        ([str(runs["fields"]), str(two)], f"Run {runs['fields']} was trained on field images of unknown scale"),
        ([str(runs["coarse"]), str(field)], "field.png is not a whole-slide image"),
    ]
    for (run, *slide), said in cases:
        assert main(["predict-slide", "--run", run, "--out", str(tmp_path / "out"), *slide]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and said in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_slide_is_cut_only_at_its_model_s_scale_and_a_cancel_stops_it_between_batches(home):
    settings, runs, (two, _, _), _ = home
    model = predictor(settings, runs["coarse"])
    with pytest.raises(ValueError, match="trained at"):
        predict_slide(model, two, scale=SCALE, settings=settings)
    with pytest.raises(UserError, match="unknown scale"):
        slide_scale(predictor(settings, runs["fields"]))
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(SlideCancelled, match="after 4 of"):
        predict_slide(model, two, scale=COARSE, settings=settings, batch=2, cancelled=cancelled)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_a_huge_mostly_empty_slide_is_predicted_in_bounded_memory(home, tmp_path):
    # 100,000 x 80,000 at 0.25 um/px (24 GB of RGB at level 0) with one block of tissue, 5 x 4 tiles.
    settings, runs, _, _ = home
    tissue = Region(60_160, 30_208, 1280, 1024, class_texture("MCL"))
    path = write_slide(tmp_path / "huge.tif", 100_000, 80_000, [tissue], levels=5, factor=4, sparse=True)
    model = predictor(settings, runs["coarse"])
    model.predict([synthetic_image("MCL", 0, (32, 32))])  # the model's first call allocates its own buffers
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    pred = predict_slide(model, path, scale=COARSE, settings=settings)
    grown_mb = (_status_kb("VmHWM") - before) / 1024
    assert pred.n_tiles == 20 and all(inside(t.x, t.y, 256, tissue) for t in pred.tiling.tiles)
    assert pred.kind == "raw" and pred.refer is None  # a run without calibration has no refer band
    assert outputs.heat_map(pred).predicted.shape == (312, 390)
    # It rises ~25 MB (the thumbnail, the batches, the grid); reading the slide's 16x level whole would
    # take 125 MB, its 4x level 2 GB.
    assert grown_mb < 100, f"resident memory rose {grown_mb:.0f} MB"
