"""Temperature scaling, ECE, reliability data and figure, bootstrap intervals, the refer threshold."""

import numpy as np
import pytest

from core.errors import UserError
from core.evaluation.calibration import (
    bootstrap_metrics,
    expected_calibration_error,
    fit_temperature,
    format_bootstrap,
    refer_band,
    refer_threshold,
    reliability_bins,
    reliability_figure,
    softmax,
    supported_target,
)


def calibrated_logits(n: int, n_classes: int = 3, seed: int = 0):
    """Logits whose softmax is the true probability of the sampled label: calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, n_classes))
    probs = softmax(logits)
    labels = np.array([rng.choice(n_classes, p=p) for p in probs])
    return logits, labels


def test_temperature_scaling_fixes_an_over_confident_model():
    logits, labels = calibrated_logits(4000)
    val, test = slice(0, 2000), slice(2000, None)
    over = logits * 5  # the same ranking, far too sure
    t = fit_temperature(over[val], labels[val])
    assert 3.5 < t < 7  # recovers the x5
    before = expected_calibration_error(softmax(over[test]), labels[test])
    after = expected_calibration_error(softmax(over[test], t), labels[test])
    assert before > 0.1 and after < 0.04 and after < before / 3
    # Temperature never changes the predicted class.
    assert (softmax(over[test], t).argmax(1) == over[test].argmax(1)).all()


def test_reliability_bins_and_figure():
    logits, labels = calibrated_logits(600, seed=1)
    probs = softmax(logits * 5)
    bins = reliability_bins(probs, labels)
    assert len(bins.count) == 15 and bins.count.sum() == 600
    filled = bins.count > 0
    assert ((bins.confidence[filled] > bins.lower[filled]) & (bins.confidence[filled] <= bins.upper[filled])).all()
    assert bins.ece == pytest.approx(expected_calibration_error(probs, labels))
    fig = reliability_figure(bins, other=reliability_bins(softmax(logits), labels))
    names = [trace.name for trace in fig.data]
    assert names[0] == "perfect calibration" and any("before" in n for n in names) and any("after" in n for n in names)


def test_perfect_predictions_have_zero_ece():
    labels = np.array([0, 1, 2, 1])
    probs = np.eye(3)[labels]
    assert expected_calibration_error(probs, labels) == 0.0


def _predictions(n: int, accuracy: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, n)
    wrong = rng.random(n) > accuracy
    y_pred = np.where(wrong, (y_true + rng.integers(1, 3, n)) % 3, y_true)
    return y_true, y_pred


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_samples():
    small = bootstrap_metrics(*_predictions(60), ["CLL", "FL", "MCL"], n_resamples=1000, seed=0)
    large = bootstrap_metrics(*_predictions(2000), ["CLL", "FL", "MCL"], n_resamples=1000, seed=0)
    for result in (small, large):
        intervals = [result.accuracy] + [i for m in result.per_class.values() for i in m.values()]
        for i in intervals:
            assert i.low <= i.estimate <= i.high
    assert large.accuracy.width < small.accuracy.width / 3  # ~ 1 / sqrt(n)
    for name in ("CLL", "FL", "MCL"):
        for metric in ("precision", "recall", "f1"):
            assert large.per_class[name][metric].width < small.per_class[name][metric].width
    assert "| CLL |" in format_bootstrap(small)


def test_bootstrap_is_seeded_and_matches_the_point_estimates():
    y_true, y_pred = _predictions(200)
    a = bootstrap_metrics(y_true, y_pred, ["a", "b", "c"], seed=7)
    b = bootstrap_metrics(y_true, y_pred, ["a", "b", "c"], seed=7)
    c = bootstrap_metrics(y_true, y_pred, ["a", "b", "c"], seed=8)
    assert a == b and a.accuracy != c.accuracy
    assert a.accuracy.estimate == pytest.approx((y_true == y_pred).mean())
    tp = ((y_true == 1) & (y_pred == 1)).sum()
    assert a.per_class["b"]["recall"].estimate == pytest.approx(tp / (y_true == 1).sum())
    assert a.per_class["b"]["precision"].estimate == pytest.approx(tp / (y_pred == 1).sum())


def test_refer_band_claims_only_what_the_validation_part_can_bound():
    # 40 validation predictions; the 10 least confident are the wrong ones.
    conf = np.linspace(0.99, 0.4, 40)
    probs = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)
    labels = np.array([0] * 30 + [1] * 10)
    # 30 of 40 right is 75%, but the 95% lower bound is about 61%: no threshold below the 30 right ones.
    band = refer_band(probs, labels, 0.75)
    kept = conf >= band.threshold
    assert 30 <= band.accepted == kept.sum() < 40
    assert 0.75 <= band.bound < (labels[kept] == 0).mean()  # a lower bound, below the raw rate
    assert refer_threshold(probs, labels, 0.5) == 0.0  # the lower bound for all 40 clears 50%
    # 30 of 30 right: the bound at 95% (split over the tested thresholds) is about 0.88, not 1.
    assert refer_band(probs, labels, 0.95).threshold is None
    assert 0.85 < supported_target(probs, labels) < 0.95
    assert refer_threshold(probs, np.ones(40, int), 0.5) is None  # every prediction is wrong
    with pytest.raises(UserError, match="target accuracy"):
        refer_threshold(probs, labels, 1.5)


def test_a_weak_model_with_few_validation_images_refers_everything_at_80_percent():
    # 26 validation images, 14 right (54%), the right ones a little more confident: the raw
    # accuracy of the most confident few passes 80%, but no threshold can claim it.
    rng = np.random.default_rng(1)
    right = np.array([True] * 14 + [False] * 12)
    conf = np.where(right, rng.uniform(0.4, 0.6, 26), rng.uniform(0.34, 0.5, 26))
    probs = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], 1)
    labels = np.where(right, 0, 1)
    top = np.argsort(-conf)[:4]
    assert right[top].all()  # what the raw rate would have accepted at 80%
    assert refer_band(probs, labels, 0.8).threshold is None
    assert supported_target(probs, labels) < 0.8


def test_kept_predictions_meet_the_target_at_the_stated_confidence_over_repeated_draws():
    """A calibrated synthetic model: confidence c uniform on [0.34, 1], right with probability c, so
    the true accuracy of the predictions kept at threshold t is (1 + t) / 2 (t > 0.34)."""
    rng = np.random.default_rng(0)
    target, confidence, draws, n = 0.85, 0.9, 400, 1000
    failures = raw_failures = found = 0
    for _ in range(draws):
        conf = rng.uniform(0.34, 1, n)
        labels = np.where(rng.random(n) < conf, 0, 1)
        probs = np.stack([conf, 1 - conf], 1)
        band = refer_band(probs, labels, target, confidence)
        if band.threshold is not None:
            found += 1
            failures += (1 + max(band.threshold, 0.34)) / 2 < target
        # The raw accepted rate as the criterion (what the band used to do) fails about half the time.
        order = np.argsort(-conf)
        raw = np.cumsum(labels[order] == 0) / np.arange(1, n + 1)
        raw_t = conf[order][np.flatnonzero(raw >= target).max()]
        raw_failures += (1 + raw_t) / 2 < target
    assert found > 0.9 * draws  # not vacuous: a threshold is found nearly every time
    assert failures / draws <= 1 - confidence
    assert raw_failures / draws > 0.2


def test_group_bootstrap_is_wider_when_groups_are_correlated():
    # 10 specimens of 20 images each; a specimen is either all right or all wrong.
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(10), 20)
    right = np.repeat(rng.random(10) < 0.7, 20)
    y_true = np.repeat(rng.integers(0, 3, 10), 20)
    y_pred = np.where(right, y_true, (y_true + 1) % 3)
    by_image = bootstrap_metrics(y_true, y_pred, ["a", "b", "c"])
    by_group = bootstrap_metrics(y_true, y_pred, ["a", "b", "c"], groups=groups)
    assert by_group.accuracy.estimate == by_image.accuracy.estimate
    assert by_group.accuracy.low <= by_group.accuracy.estimate <= by_group.accuracy.high
    assert by_group.accuracy.width > 2 * by_image.accuracy.width
    assert by_group.n_groups == 10 and by_image.n_groups is None
    assert "10 groups resampled whole" in format_bootstrap(by_group)
    # One group per sample is the same as plain resampling.
    assert bootstrap_metrics(y_true, y_pred, ["a", "b", "c"], groups=np.arange(200)).accuracy == by_image.accuracy
    with pytest.raises(UserError, match="one group per sample"):
        bootstrap_metrics(y_true, y_pred, ["a", "b", "c"], groups=[1, 2])


def test_run_calibration_fits_on_validation_and_carries_to_test():
    from core.evaluation.calibration import refer_verdict, run_calibration

    rng = np.random.default_rng(0)

    def overconfident(n):
        labels = rng.integers(0, 3, n)
        logits = rng.normal(0, 1, (n, 3))
        logits[np.arange(n), labels] += 1.0  # right about 60% of the time ...
        return softmax(logits * 6), labels  # ... but nearly always "sure"

    val_p, val_y = overconfident(400)
    test_p, test_y = overconfident(400)
    out = run_calibration(val_p, val_y, test_p, test_y, target_accuracy=0.7)
    assert out.temperature > 2  # softened: the model was over-confident
    assert out.val_ece_after < out.val_ece_before / 2
    assert out.test_ece_after < out.test_ece_before / 2
    threshold = out.refer_threshold
    assert 0 < threshold < 1 and out.n_val == 400 == len(out.val_probs)
    # The band keeps only confident predictions, which are the more accurate ones.
    assert 0 < out.test_coverage < 1 and out.test_accepted_accuracy > 0.65
    assert out.refer_bound >= 0.7 and out.refer_confidence == 0.95 and out.refer_accepted < 400
    # The raw rate would have claimed 80% here; at 95% confidence, 400 images cannot.
    assert run_calibration(val_p, val_y, test_p, test_y, target_accuracy=0.8).refer_threshold is None
    refer = refer_verdict(np.asarray(out.val_probs), threshold)
    assert refer.any() and not refer.all()
    assert refer_verdict(np.asarray(out.val_probs), None).all()
    assert run_calibration(val_p[:0], val_y[:0], test_p, test_y).temperature is None


def test_every_image_right_is_no_certainty_the_interval_stays_honest():
    """Six of six right: every bootstrap resample is 100%, but six images bound the accuracy only at
    about 54% (Clopper-Pearson, 95%); the interval says so."""
    result = bootstrap_metrics([0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2], ["a", "b", "c"])
    assert result.accuracy.estimate == 1.0 and result.accuracy.high == 1.0
    assert result.accuracy.low == pytest.approx(0.5407, abs=1e-3)
    wrong = bootstrap_metrics([0, 0, 0, 0], [1, 1, 1, 1], ["a", "b"])
    assert wrong.accuracy.low == 0.0 and wrong.accuracy.high == pytest.approx(0.6024, abs=1e-3)
