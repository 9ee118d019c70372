"""The per-run generalisation switches: stain normalisation, HED jitter and test-time augmentation."""

import numpy as np
import pytest
import torch
from sqlalchemy import select
from torch import nn

from core.__main__ import build_parser, config_from_args
from core.data.datasets import image_path
from core.data.decoding import load_rgb
from core.errors import UserError
from core.inference.model_file import read_model
from core.inference.predict import load_predictor, predict_files
from core.store.db import Image, Prediction, Run, RunStatus, SplitMember
from core.store.records import RunSummary
from core.training.loop import predict_logits, predict_proba, tta_views
from core.training.run_config import RunConfig
from core.transforms.stain import choose_reference, mean_optical_density
from tests.synthetic import ingest_synthetic, synthetic_array, train_runs

SMALL = dict(image_size=32, per_class=8, epochs=1, batch_size=16, lr=1e-3, weights="none", device="cpu")


@pytest.fixture
def dataset(tmp_path, settings, Session):
    return ingest_synthetic(tmp_path / "src", settings, Session, per_class=8)


def test_run_with_every_switch_on_records_them_and_a_training_reference(dataset, settings, Session):
    config = RunConfig(dataset=dataset, stain_normalisation="macenko", hed_jitter=0.05, tta=True, **SMALL)
    (run_id,) = train_runs(Session, settings, config)
    with Session() as s:
        run = s.get(Run, run_id)
        assert run.status == RunStatus.succeeded, run.error
        stored = RunConfig.from_dict(run.config)
        assert (stored.stain_normalisation, stored.hed_jitter, stored.tta) == ("macenko", 0.05, True)
        reference = run.summary["stain_reference_image_id"]
        parts = dict(
            s.execute(
                select(SplitMember.image_id, SplitMember.part).where(
                    SplitMember.split_id == run.split_id, SplitMember.fold == run.fold
                )
            ).all()
        )
        assert parts[reference] == "train"
        preds = s.scalars(select(Prediction).where(Prediction.run_id == run_id)).all()
        assert {p.image_id for p in preds} == {i for i, part in parts.items() if part == "test"}
        assert all(abs(sum(p.probabilities) - 1) < 1e-3 for p in preds)
    _, meta = read_model(settings.runs_dir / str(run_id) / "model.safetensors")
    assert meta["stain_reference_image_id"] == reference and meta["preparation"]["stain_params"]["method"] == "macenko"

    # Prediction prepares a new image exactly as the run's test images were (normalised, TTA).
    with Session() as s:
        predictor = load_predictor(s, settings, run_id, device="cpu")
        assert predictor.normaliser is not None and predictor.tta
        pred = preds[0]
        image = s.get(Image, pred.image_id)
        probs = predictor.probabilities([load_rgb(image_path(settings, image))])[0]
    assert np.allclose(probs, pred.probabilities, atol=1e-4)

    # Calibrated on the run's own validation part; the Predict page's refer band comes from it.
    calibration = RunSummary.from_dict(run.summary).calibration
    n_val = sum(part == "val" for part in parts.values())
    assert n_val >= 1 and calibration.n_val == n_val == len(calibration.val_labels)
    assert calibration.temperature > 0 and calibration.refer_target == 0.9
    assert predictor.calibration == calibration  # the model file's record reads as the summary's
    assert predictor.refer_threshold() == calibration.refer_threshold
    calibrated = predictor.calibrated(np.asarray([probs]))[0]
    assert np.isclose(calibrated.sum(), 1) and calibrated.argmax() == probs.argmax()
    rows = predict_files(predictor, [image_path(settings, image)])
    assert rows[0]["uncertain_refer"] == (
        predictor.refer_threshold() is None or calibrated.max() < predictor.refer_threshold()
    )


def test_switches_default_off_and_old_configs_still_load():
    config = RunConfig(dataset="d")
    assert (config.stain_normalisation, config.hed_jitter, config.tta) == ("none", 0.0, False)
    old = {k: v for k, v in config.to_dict().items() if k not in ("stain_normalisation", "hed_jitter", "tta")}
    assert RunConfig.from_dict(old) == config


@pytest.mark.parametrize(
    "changes, allowed",
    [
        ({"stain_normalisation": "vahadane"}, "none, macenko, reinhard"),
        ({"hed_jitter": -0.1}, "from 0"),
        ({"hed_jitter": float("nan")}, "from 0"),
        ({"hed_jitter": 2.0}, "to 1"),
        ({"hed_jitter": True}, "from 0"),
        ({"tta": "yes"}, "true or false"),
    ],
)
def test_bad_switch_values_are_user_errors_naming_the_allowed_ones(changes, allowed):
    with pytest.raises(UserError, match=allowed):
        RunConfig(dataset="d", **changes)


def test_cli_flags_reach_the_config(settings):
    parser = build_parser()
    args = parser.parse_args(
        [
            "train",
            "--dataset",
            "d",
            "--weights",
            "none",
            "--stain-normalisation",
            "reinhard",
            "--hed-jitter",
            "0.03",
            "--tta",
        ]
    )
    config = config_from_args(args, settings)
    assert (config.stain_normalisation, config.hed_jitter, config.tta) == ("reinhard", 0.03, True)
    config = config_from_args(parser.parse_args(["train", "--dataset", "d", "--weights", "none", "--no-tta"]), settings)
    assert (config.stain_normalisation, config.hed_jitter, config.tta) == ("none", 0.0, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dataset", "d", "--stain-normalisation", "vahadane"])


def test_tta_averages_the_softmax_of_the_four_views():
    torch.manual_seed(0)
    # Not flip-invariant (a linear layer on the flattened image), so the views really differ.
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    device = torch.device("cpu")
    probs = predict_proba(model, x, device, tta=True)
    assert probs.shape == (5, 4)
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    views = tta_views(x)
    assert len(views) == 4 and torch.equal(views[0], x) and torch.equal(views[3], x.flip(2).flip(3))
    expected = torch.stack([torch.softmax(predict_logits(model, v, device), 1) for v in views]).mean(0)
    assert torch.allclose(probs, expected, atol=1e-6)
    plain = predict_proba(model, x, device)
    assert torch.allclose(plain, torch.softmax(predict_logits(model, x, device), 1))
    assert not torch.allclose(plain, probs)
    assert predict_proba(model, x[:0], device, tta=True).numel() == 0


def test_stain_reference_is_the_median_optical_density_training_image():
    arrays = [synthetic_array(label, i, (32, 32)) for label in ("CLL", "FL", "MCL") for i in range(3)]
    ids = list(range(100, 109))
    ref_id, normaliser = choose_reference(arrays, ids, "reinhard")
    od = [mean_optical_density(a) for a in arrays]
    assert ref_id == ids[int(np.argsort(od, kind="stable")[4])]
    assert normaliser(arrays[0]).shape == arrays[0].shape
    # Same input, same choice (in any order).
    assert choose_reference(arrays[::-1], ids[::-1], "reinhard")[0] == ref_id
    with pytest.raises(UserError):
        choose_reference([], [], "macenko")
