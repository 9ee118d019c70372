"""The colour-only yardstick: high where classes differ in colour, chance where only texture tells them apart."""

import numpy as np
import pytest

from core.evaluation import yardstick
from core.store.records import Yardstick
from tests.synthetic import synthetic_array


def stripes(vertical: bool, index: int) -> np.ndarray:
    """Two-tone stripes with the same colours, and so the same colour statistics, for both classes."""
    rng = np.random.default_rng(index)
    shift = int(rng.integers(0, 8))
    band = ((np.arange(48) + shift) // 4) % 2
    mask = np.tile(band[None, :], (48, 1)) if vertical else np.tile(band[:, None], (1, 48))
    return np.where(mask[..., None] == 1, [200, 80, 160], [90, 60, 200]).astype(np.uint8)


def test_colour_features_are_the_twelve_statistics():
    image = synthetic_array("CLL", 0)
    f = yardstick.colour_features(image)
    assert f.shape == (12,)
    assert np.allclose(f[:3], image.reshape(-1, 3).mean(0))
    assert np.all(f[6:9] > 0)  # optical density of a stained (non-white) image


def test_classes_that_differ_in_colour_are_told_apart_by_colour_alone():
    labels = ("CLL", "FL", "MCL")
    train = [(synthetic_array(c, i), k) for k, c in enumerate(labels) for i in range(8)]
    test = [(synthetic_array(c, 100 + i), k) for k, c in enumerate(labels) for i in range(5)]
    accuracy = yardstick.colour_only_accuracy(*zip(*train), *zip(*test))
    assert accuracy >= 0.9


def test_classes_that_differ_only_in_texture_leave_colour_at_chance():
    train = [(stripes(v, i), int(v)) for v in (False, True) for i in range(10)]
    test = [(stripes(v, 50 + i), int(v)) for v in (False, True) for i in range(10)]
    accuracy = yardstick.colour_only_accuracy(*zip(*train), *zip(*test))
    assert accuracy <= 0.6


def test_fold_summary_line_and_empty_test_part():
    line = yardstick.describe_folds([Yardstick(0.5), None, Yardstick(0.7)])
    assert "60.0% ± 14.1%" in line and "2 folds" in line
    assert yardstick.describe_folds([None]) is None
    with pytest.raises(ValueError):
        yardstick.colour_only_accuracy([synthetic_array("CLL", 0)], [0], [], [])
