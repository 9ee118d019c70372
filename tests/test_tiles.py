"""Tiles at native resolution: the grid, the pixels, the vote, and a run that trains and predicts on them."""

import numpy as np
import pytest
import torch
from sqlalchemy import select

from core.data import cache
from core.data.datasets import image_path
from core.data.decoding import load_rgb
from core.errors import UserError
from core.inference.predict import load_predictor
from core.store.db import Image, Prediction, Run, RunStatus, SplitMember
from core.store.records import RunSummary
from core.training.run_config import RunConfig
from core.transforms.pipelines import EvalPipeline
from core.transforms.tiles import cut_tiles, tile_boxes, vote
from tests.synthetic import ingest_synthetic, synthetic_image, train_runs


def test_grid_of_whole_tiles_is_centred_and_capped_evenly():
    boxes = tile_boxes(1388, 1040, 224, 100)
    assert len(boxes) == 6 * 4  # whole 224 px squares only
    assert boxes[0] == (
        (1388 - 6 * 224) // 2,
        (1040 - 4 * 224) // 2,
        (1388 - 6 * 224) // 2 + 224,
        (1040 - 4 * 224) // 2 + 224,
    )
    assert all(r - l == 224 and b - t == 224 and 0 <= l and r <= 1388 and 0 <= t and b <= 1040 for l, t, r, b in boxes)
    assert len({(l, t) for l, t, _, _ in boxes}) == 24  # no two the same, and none overlap (grid steps of 224)
    capped = tile_boxes(1388, 1040, 224, 5)
    assert len(capped) == 5 and capped[0] == boxes[0] and capped[-1] == boxes[-1] and set(capped) <= set(boxes)
    assert tile_boxes(100, 300, 224, 8) == [(0, 0, 100, 300)]  # smaller than a tile: the whole image
    with pytest.raises(ValueError):
        tile_boxes(100, 100, 32, 0)


def test_tiles_keep_native_pixels():
    image = synthetic_image("FL", 3, (100, 70))
    tiles = cut_tiles(image, 32, 16)
    assert tiles.shape == (3 * 2, 32, 32, 3) and tiles.dtype == np.uint8
    pixels = np.asarray(image)
    left, top = (100 - 96) // 2, (70 - 64) // 2
    assert np.array_equal(tiles[0], pixels[top : top + 32, left : left + 32])  # not resampled
    assert np.array_equal(tiles[4], pixels[top + 32 : top + 64, left + 32 : left + 64])


def test_vote_is_the_mean_of_each_images_tiles():
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]])
    out = vote(probs, np.array([0, 0, 1, 1]), 2)
    assert np.allclose(out, [[0.7, 0.3], [0.1, 0.9]])
    with pytest.raises(ValueError):
        vote(probs, np.array([0, 0, 0, 0]), 2)  # image 1 has no tile


def test_tiles_are_an_honest_split_option_only():
    with pytest.raises(UserError, match="whole number"):
        RunConfig(dataset="d", tiles=-1)
    with pytest.raises(UserError, match="paper"):
        RunConfig(dataset="d", split="paper-leaky", tiles=4)
    assert RunConfig(dataset="d").tiles == 0


def test_tile_cache_follows_size_and_count(tmp_path, settings, Session):
    name = ingest_synthetic(tmp_path / "src", settings, Session, per_class=1)
    with Session() as s:
        image = s.scalars(select(Image)).first()

        def tiles(size: int, count: int) -> np.ndarray:  # as a tiled run prepares its images
            return cache.image_samples(settings, image, EvalPipeline(image_size=size, tiles=count))

        two, one = tiles(32, 2), tiles(32, 1)
        assert two.shape == (2, 32, 32, 3) and one.shape == (1, 32, 32, 3)
        assert np.array_equal(tiles(32, 2), two)  # from the cache now
        assert tiles(16, 2).shape == (2, 16, 16, 3)
    assert name


def test_tiled_run_predicts_each_test_image_by_its_tiles(tmp_path, settings, Session):
    name = ingest_synthetic(tmp_path / "src", settings, Session, per_class=8)  # 64x48 images: 2 tiles of 32 px
    config = RunConfig(
        dataset=name,
        tiles=4,
        image_size=32,
        per_class=8,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        weights="none",
        device="cpu",
    )
    (run_id,) = train_runs(Session, settings, config)
    with Session() as s:
        run = s.get(Run, run_id)
        assert run.status == RunStatus.succeeded, run.error
        parts = dict(
            s.execute(
                select(SplitMember.image_id, SplitMember.part).where(
                    SplitMember.split_id == run.split_id, SplitMember.fold == run.fold
                )
            ).all()
        )
        test_ids = {i for i, part in parts.items() if part == "test"}
        preds = s.scalars(select(Prediction).where(Prediction.run_id == run_id)).all()
        assert {p.image_id for p in preds} == test_ids and len(preds) == len(test_ids)  # one per image, not per tile
        assert run.summary["n_test"] == len(test_ids)
        assert RunSummary.from_dict(run.summary).calibration.n_val == sum(part == "val" for part in parts.values())
        predictor = load_predictor(s, settings, run_id, device="cpu")
        image = s.get(Image, preds[0].image_id)
        full = load_rgb(image_path(settings, image))
    assert predictor.tiles == 4
    probs = predictor.probabilities([full])[0]
    assert np.allclose(probs, preds[0].probabilities, atol=1e-4)
    # The vote really is over the tiles: the mean of the tiles' own probabilities.
    tiles = cut_tiles(full, 32, 4)
    from core.data.cache import to_tensor
    from core.training.loop import predict_proba

    per_tile = predict_proba(predictor.model, to_tensor(list(tiles)), torch.device("cpu")).numpy()
    assert len(tiles) == 2 and np.allclose(probs, per_tile.mean(0), atol=1e-5)
