"""Paired comparisons of two models on the same test images (core/evaluation/compare.py)."""

import numpy as np
import pytest

from core.evaluation.compare import fold_spread, mcnemar_exact, paired_comparison


def test_a_gap_of_three_images_in_fifty_two_is_within_noise():
    rng = np.random.default_rng(0)
    b = rng.random(52) < 0.54  # 53.8% of 52 is 28 images
    a = b.copy()
    a[np.flatnonzero(~b)[:3]] = True  # three more right: 59.6%
    c = paired_comparison(dict(enumerate(a)), dict(enumerate(b)))
    assert c.n == 52 and c.difference == pytest.approx(3 / 52)
    assert c.within_noise and c.only_a == 3 and c.only_b == 0
    words = c.verdict("run 4", "run 3")
    assert "within noise" in words and "5.8 points above" in words and "same 52 test images" in words


def test_a_large_gap_on_many_images_is_beyond_noise_and_only_shared_images_count():
    rng = np.random.default_rng(1)
    truth = rng.random(400)
    a = {i: t < 0.85 for i, t in enumerate(truth)}
    b = {i: t < 0.55 for i, t in enumerate(truth)}
    b[10_000] = True  # scored by B only: not part of the comparison
    c = paired_comparison(a, b)
    assert c.n == 400 and not c.within_noise and c.low > 0.2
    assert c.p_value < 1e-6 and "better beyond noise" in c.verdict("the network", "colour alone")
    assert paired_comparison({1: True}, {2: True}) is None


def test_whole_specimens_resampled_give_a_wider_interval():
    rng = np.random.default_rng(2)
    specimen = np.repeat(np.arange(10), 20)
    right_a = np.repeat(rng.random(10) < 0.7, 20)  # a specimen is all right or all wrong
    right_b = np.repeat(rng.random(10) < 0.5, 20)
    a, b = dict(enumerate(right_a)), dict(enumerate(right_b))
    by_image = paired_comparison(a, b)
    by_specimen = paired_comparison(a, b, groups=dict(enumerate(specimen)))
    assert by_specimen.groups == 10 and by_image.groups is None
    assert (by_specimen.high - by_specimen.low) > 2 * (by_image.high - by_image.low)


def test_mcnemar_exact_matches_the_binomial_test():
    from scipy.stats import binomtest

    for only_a, only_b in ((0, 0), (3, 0), (10, 4), (7, 7), (1, 12)):
        expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b).pvalue
        assert mcnemar_exact(only_a, only_b) == pytest.approx(expected)


def test_folds_that_differ_by_a_few_images_are_within_noise_and_far_apart_ones_are_not():
    close = fold_spread([12, 15, 14, 13, 16], [26, 26, 25, 25, 25])  # 46% to 64%
    assert close.within_noise and close.p_value > 0.3
    assert "5 folds score 46.2% to 64.0%" in close.verdict() and "within noise" in close.verdict()
    apart = fold_spread([25, 24, 5, 6, 25], [26, 26, 25, 25, 25])
    assert not apart.within_noise and apart.p_value < 0.01
    assert "beyond noise" in apart.verdict() and "within noise" not in apart.verdict()
    assert fold_spread([26, 26], [26, 26]).within_noise  # all right everywhere: nothing to tell apart
    assert fold_spread([10], [20]) is None


def test_the_fold_test_is_wrong_at_most_as_often_as_its_level_allows():
    """Folds drawn from one accuracy (60%) are called different in at most about 5% of draws."""
    rng = np.random.default_rng(1)
    calls = [
        not fold_spread(list(rng.binomial(25, 0.6, size=5)), [25] * 5, resamples=400, seed=i).within_noise
        for i in range(150)
    ]
    assert np.mean(calls) <= 0.09
