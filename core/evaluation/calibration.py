"""Calibration and uncertainty of a trained classifier's outputs.

  fit_temperature      one scalar T fitted on validation logits (Guo et al. 2017): softmax(z / T)
                       keeps every prediction and sharpens or softens the probabilities
  expected_calibration_error, reliability_bins, reliability_figure
                       how far "90% sure" is from being right 90% of the time (15 equal-width bins)
  bootstrap_metrics    seeded percentile confidence intervals for accuracy and per-class
                       precision/recall/F1 (optionally resampling whole specimens): with ~50 test
                       images an accuracy of 0.80 means "somewhere around 0.68-0.90", and a report
                       should say so
  refer_band           the confidence below which a prediction is not shown as a diagnosis but as
                       "uncertain, refer", chosen on validation so that the predictions shown reach a
                       target accuracy with a stated confidence (a binomial bound, not the raw rate)
  run_calibration       what a run records of both (core/store/records.py CalibrationRecord), which
                       core/evaluation/calibration_words.py says in words

Plain NumPy; the figure is plotly (no streamlit), so both the pages and reports can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import UserError
from core.store.records import CalibrationRecord

N_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: Sequence[int], bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the validation negative log-likelihood of softmax(logits / T).

    The NLL is convex in 1/T, so a bounded scalar search over log T (scipy's Brent method) finds
    the optimum; T > 1 means the model was over-confident. Args: logits (N, C) before softmax,
    labels (N,) class indices.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise UserError("Temperature scaling needs (N, C) validation logits and N labels, N >= 1.")
    found = minimize_scalar(
        lambda log_t: _nll(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(found.x))


@dataclass
class ReliabilityBins:
    lower: np.ndarray  # (n_bins,) bin edges of the top probability
    upper: np.ndarray
    confidence: np.ndarray  # mean top probability in the bin (nan when empty)
    accuracy: np.ndarray  # fraction correct in the bin (nan when empty)
    count: np.ndarray  # predictions in the bin

    @property
    def ece(self) -> float:
        n = self.count.sum()
        filled = self.count > 0
        if n == 0:
            return 0.0
        return float((self.count[filled] / n * np.abs(self.accuracy[filled] - self.confidence[filled])).sum())


def reliability_bins(probs: np.ndarray, labels: Sequence[int], n_bins: int = N_BINS) -> ReliabilityBins:
    """Bin predictions by top probability into `n_bins` equal-width bins over [0, 1]."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    conf = probs.max(1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(1) == labels) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0, 1, n_bins + 1)
    # Bins are (lower, upper], the first also takes 0: as in Guo et al.
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=correct.astype(float), minlength=n_bins) / count
    return ReliabilityBins(edges[:-1], edges[1:], confidence, accuracy, count)


def expected_calibration_error(probs: np.ndarray, labels: Sequence[int], n_bins: int = N_BINS) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over the bins (0 = perfectly calibrated)."""
    return reliability_bins(probs, labels, n_bins).ece


def reliability_figure(
    bins: ReliabilityBins,
    title: str = "Reliability diagram",
    *,
    other: ReliabilityBins | None = None,
    names: tuple[str, str] = ("before", "after"),
):
    """A plotly reliability diagram: accuracy per confidence bin against the diagonal.

    Pass `other` (e.g. the bins after temperature scaling) to draw both; `names` labels them.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", line=dict(dash="dash", color="grey"))
    )
    for b, name in ((bins, names[0]), (other, names[1])):
        if b is None:
            continue
        filled = b.count > 0
        centre = (b.lower + b.upper) / 2
        fig.add_trace(
            go.Bar(
                x=centre[filled],
                y=b.accuracy[filled],
                width=(b.upper - b.lower)[filled] * (0.9 if other is None else 0.45),
                name=f"{name} (ECE {b.ece:.3f})" if other is not None else f"accuracy (ECE {b.ece:.3f})",
                customdata=np.stack([b.count[filled], b.confidence[filled]], 1),
                text=[f"{int(n)}" for n in b.count[filled]],
                textposition="outside",  # images in the bin
                hovertemplate="confidence %{customdata[1]:.3f}<br>accuracy %{y:.3f}<br>%{customdata[0]} predictions<extra></extra>",
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="confidence (top probability); the number over a bar: its images",
        yaxis_title="accuracy",
        xaxis_range=[0, 1],
        yaxis_range=[0, 1.1],
        barmode="group",
        bargap=0.05,
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Bootstrap


@dataclass
class Interval:
    estimate: float  # on the full test set
    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


@dataclass
class BootstrapResult:
    level: float  # e.g. 0.95
    n_resamples: int
    seed: int
    accuracy: Interval
    per_class: dict[str, dict[str, Interval]]  # class -> {"precision", "recall", "f1"}
    n_groups: int | None = None  # groups resampled whole (cluster bootstrap); None: samples one by one


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """precision, recall, f1 per class from (..., C, C) confusion matrices; nan where undefined."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    predicted, actual = cm.sum(-2), cm.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / predicted
        recall = tp / actual
        f1 = 2 * tp / (predicted + actual)
    return precision, recall, f1


def bootstrap_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    classes: Sequence[str],
    *,
    groups: Sequence[object] | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile bootstrap intervals for accuracy and per-class precision/recall/F1.

    Without `groups`, test samples are drawn with replacement. With `groups` (one id per sample:
    the specimen, or the source image of augmented copies), whole groups are drawn with
    replacement (a cluster bootstrap): samples of one group are not independent, and resampling
    them one by one makes the interval too narrow. A resample where a metric is undefined (e.g. no
    prediction of a class, so no precision) is left out of that metric's interval.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    n, c = len(y_true), len(classes)
    if n == 0 or len(y_pred) != n:
        raise UserError("Bootstrap needs the same number (>= 1) of true and predicted labels.")
    if groups is not None and len(groups) != n:
        raise UserError(f"Bootstrap needs one group per sample: {len(groups)} groups for {n} samples.")
    if not 0 < level < 1:
        raise UserError(f"level must be between 0 and 1, got {level}.")
    if groups is None:
        group_of = np.arange(n)
    else:  # numbered in order of first appearance, so any hashable ids work
        index = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        group_of = np.array([index[g] for g in groups])
    n_groups = int(group_of.max()) + 1
    # Confusion matrix of each group, flattened: (G, C*C).
    per_group = np.zeros((n_groups, c * c))
    np.add.at(per_group, (group_of, y_true * c + y_pred), 1)
    # How often each group is drawn in each resample: (B, G); a resample's confusion matrix is
    # the draw-weighted sum of its groups' matrices.
    draws = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_resamples)
    cms = (draws @ per_group).reshape(n_resamples, c, c)
    full = per_group.sum(0).reshape(c, c)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]

    def interval(estimate: float, samples: np.ndarray) -> Interval:
        samples = samples[np.isfinite(samples)]
        if not samples.size or not np.isfinite(estimate):
            return Interval(float(estimate), float("nan"), float("nan"))
        low, high = np.percentile(samples, q)
        return Interval(float(estimate), float(low), float(high))

    accuracy = interval(np.trace(full) / n, np.trace(cms, axis1=1, axis2=2) / cms.sum((1, 2)))
    if accuracy.estimate in (0.0, 1.0):
        # Every image right (or every one wrong): each resample says the same, and a percentile interval
        # of 100-100% would claim certainty that a few images cannot give. The exact binomial interval
        # over the groups (or images) does not.
        accuracy = Interval(accuracy.estimate, *_exact_interval(int(accuracy.estimate) * n_groups, n_groups, level))
    p_full, r_full, f_full = _per_class(full)
    p_s, r_s, f_s = _per_class(cms)
    per_class = {
        name: {
            "precision": interval(p_full[k], p_s[:, k]),
            "recall": interval(r_full[k], r_s[:, k]),
            "f1": interval(f_full[k], f_s[:, k]),
        }
        for k, name in enumerate(classes)
    }
    return BootstrapResult(level, n_resamples, seed, accuracy, per_class, n_groups if groups is not None else None)


def _exact_interval(k: int, n: int, level: float) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of k successes in n."""
    from scipy.stats import beta

    tail = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def format_bootstrap(result: BootstrapResult) -> str:
    """Markdown table of the intervals."""
    pct = f"{result.level:.0%}"
    fmt = lambda i: f"{i.estimate:.3f} ({i.low:.3f}-{i.high:.3f})"  # noqa: E731
    unit = f", {result.n_groups} groups resampled whole" if result.n_groups is not None else ""
    lines = [
        f"Accuracy {fmt(result.accuracy)}, {pct} bootstrap interval ({result.n_resamples} resamples{unit}, "
        f"seed {result.seed})",
        "",
        "| class | precision | recall | F1 |",
        "| --- | --- | --- | --- |",
    ]
    for name, m in result.per_class.items():
        lines.append(f"| {name} | {fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['f1'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Refer band


def selective_accuracy(probs: np.ndarray, labels: Sequence[int], threshold: float) -> tuple[float, float]:
    """(coverage, accuracy) of the predictions whose top probability is >= threshold
    (accuracy nan when none is accepted)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    accepted = probs.max(1) >= threshold
    if not accepted.any():
        return 0.0, float("nan")
    return float(accepted.mean()), float((probs.argmax(1)[accepted] == labels[accepted]).mean())


REFER_CONFIDENCE = 0.95  # how sure the refer band's accuracy claim is, over draws of the validation part


@dataclass(frozen=True)
class ReferBand:
    """A refer threshold with what it rests on: with probability at least `confidence` (over the draw
    of the `n_val` validation images), predictions at or above `threshold` are right at least `target`
    of the time on images like those. `threshold` None: no threshold can claim that, refer every
    prediction; 0.0: every prediction can be shown."""

    threshold: float | None
    target: float
    confidence: float
    n_val: int
    accepted: int  # validation images at or above the threshold
    bound: float | None  # the lower confidence bound on their accuracy (>= target where threshold is set)


def accuracy_lower_bound(correct: int, n: int, level: float) -> float:
    """One-sided Clopper-Pearson lower bound on an accuracy seen as `correct` of `n`: the true
    accuracy is at least this with probability `level` (0 when n is 0)."""
    if n == 0:
        return 0.0
    return _exact_interval(correct, n, 2 * level - 1)[0]  # a one-sided bound at L is two-sided at 2L - 1


def _search_level(n: int, confidence: float) -> float:
    """The level of each threshold the band's binary search may test (at most ceil(log2(n + 1))
    of them), so that all its claims hold together at `confidence` (Bonferroni)."""
    return 1 - (1 - confidence) / max(1, int(np.ceil(np.log2(n + 1))))


def refer_band(
    val_probs: np.ndarray, val_labels: Sequence[int], target_accuracy: float, confidence: float = REFER_CONFIDENCE
) -> ReferBand:
    """The lowest top-probability threshold whose accepted validation predictions reach
    `target_accuracy` with the stated `confidence`: selection with guaranteed risk (Geifman and
    El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS 2017).

    A binary search over the sorted validation confidences tests at most k = ceil(log2(n + 1))
    thresholds, each with a binomial (Clopper-Pearson) lower bound at level 1 - (1 - confidence) / k,
    so that the claim holds for all of them together (Bonferroni). The raw accuracy of the accepted
    predictions is not enough: 4 right of 4 is 100%, but the true accuracy may well be 60%.
    """
    if not 0 < target_accuracy <= 1:
        raise UserError(f"target accuracy must be in (0, 1], got {target_accuracy}.")
    if not 0.5 <= confidence < 1:
        raise UserError(f"confidence must be in [0.5, 1), got {confidence}.")
    probs = np.asarray(val_probs, dtype=np.float64)
    labels = np.asarray(val_labels, dtype=int)
    if len(probs) == 0:
        raise UserError("No validation predictions to choose a refer threshold from.")
    n = len(probs)
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    order = np.argsort(conf, kind="stable")
    conf, correct = conf[order], correct[order]
    # Accepting conf >= conf[z] accepts everything from the first of conf[z]'s ties on.
    first = np.searchsorted(conf, conf, side="left")
    right_from = np.concatenate([np.cumsum(correct[::-1])[::-1], [0]])
    level = _search_level(n, confidence)

    def bound(z: int) -> float:
        start = first[z]
        return accuracy_lower_bound(int(right_from[start]), n - start, level)

    lo, hi, found = 0, n, None  # the answer lies in [lo, hi]; hi == n: no threshold found yet
    while lo < hi:
        z = (lo + hi) // 2
        b = bound(z)
        if b >= target_accuracy:
            hi, found = z, b
        else:
            lo = z + 1
    if found is None:
        return ReferBand(None, target_accuracy, confidence, n, 0, None)
    start = first[hi]
    threshold = 0.0 if start == 0 else float(conf[hi])
    return ReferBand(threshold, target_accuracy, confidence, n, n - start, found)


def refer_threshold(
    val_probs: np.ndarray, val_labels: Sequence[int], target_accuracy: float, confidence: float = REFER_CONFIDENCE
) -> float | None:
    """refer_band's threshold: below it a prediction is "uncertain, refer"; None: refer everything."""
    return refer_band(val_probs, val_labels, target_accuracy, confidence).threshold


def recorded_band(record: CalibrationRecord | None, target_accuracy: float | None = None) -> ReferBand | None:
    """The refer band of a run's calibration record (run_calibration's) for `target_accuracy` (None:
    the run's own target), chosen on its stored validation probabilities, so that the page, the log,
    the API and the exported model give one threshold however old the record is. None: the run has
    no calibration."""
    if record is None or not record.calibrated:
        return None
    if target_accuracy is None:
        target_accuracy = DEFAULT_REFER_TARGET if record.refer_target is None else record.refer_target
    return refer_band(np.asarray(record.val_probs), record.val_labels, target_accuracy)


def supported_target(val_probs: np.ndarray, val_labels: Sequence[int], confidence: float = REFER_CONFIDENCE) -> float:
    """The highest accuracy that some threshold can claim at `confidence` on this validation part
    (the accuracy targets a page may offer); 0 when no prediction is right."""
    probs = np.asarray(val_probs, dtype=np.float64)
    if len(probs) == 0:
        return 0.0
    labels = np.asarray(val_labels, dtype=int)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    n = len(probs)
    level = _search_level(n, confidence)
    return max(
        accuracy_lower_bound(int(correct[conf >= c].sum()), int((conf >= c).sum()), level) for c in np.unique(conf)
    )


# ---------------------------------------------------------------------------------------------
# Per run: fitted on the run's own validation part, kept in its summary

DEFAULT_REFER_TARGET = 0.9


def as_logits(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities, which serve as logits: softmax(log p) = p. Runs store probabilities
    (with test-time augmentation, a mean over views, which has no single logit vector)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(as_logits(probs), temperature)


def run_calibration(
    val_probs: np.ndarray,
    val_labels: Sequence[int],
    test_probs: np.ndarray,
    test_labels: Sequence[int],
    target_accuracy: float = DEFAULT_REFER_TARGET,
) -> CalibrationRecord:
    """What a run records about its own calibration (its summary's and its model file's record).

    The temperature and the refer threshold are chosen on the validation part only; the test part
    shows how well they carry over. The calibrated validation probabilities are kept too, so the
    Predict page can choose a threshold for another target accuracy.
    """
    val_probs, test_probs = np.asarray(val_probs, dtype=np.float64), np.asarray(test_probs, dtype=np.float64)
    if len(val_probs) == 0:
        return CalibrationRecord(note="no validation part: not calibrated, no refer threshold")
    temperature = fit_temperature(as_logits(val_probs), val_labels)
    val_cal = calibrate(val_probs, temperature)
    band = refer_band(val_cal, val_labels, target_accuracy)
    threshold = band.threshold
    test: dict[str, float | None] = {}
    if len(test_probs):
        test_cal = calibrate(test_probs, temperature)
        coverage, accuracy = selective_accuracy(test_cal, test_labels, 1.01 if threshold is None else threshold)
        test = {
            "test_ece_before": round(expected_calibration_error(test_probs, test_labels), 4),
            "test_ece_after": round(expected_calibration_error(test_cal, test_labels), 4),
            "test_coverage": coverage,
            "test_accepted_accuracy": None if np.isnan(accuracy) else accuracy,
        }
    return CalibrationRecord(
        temperature=round(temperature, 4),
        n_val=len(val_probs),
        val_ece_before=round(expected_calibration_error(val_probs, val_labels), 4),
        val_ece_after=round(expected_calibration_error(val_cal, val_labels), 4),
        # What the temperature was fitted to lower (the binned error above can rise a little on the same
        # images: it is another yardstick, coarse with few images).
        val_nll_before=round(_nll(as_logits(val_probs), np.asarray(val_labels, dtype=int), 1.0), 4),
        val_nll_after=round(_nll(as_logits(val_probs), np.asarray(val_labels, dtype=int), temperature), 4),
        refer_target=target_accuracy,
        refer_threshold=threshold,
        refer_confidence=band.confidence,  # the threshold's claim holds with this probability
        refer_bound=None if band.bound is None else round(band.bound, 4),
        refer_accepted=band.accepted,
        val_probs=tuple(map(tuple, np.round(val_cal, 5).tolist())),
        val_labels=tuple(int(v) for v in val_labels),
        **test,
    )


def refer_verdict(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """True where a (calibrated) prediction falls in the "uncertain, refer" band."""
    top = np.asarray(probs).max(-1)
    return np.ones_like(top, dtype=bool) if threshold is None else top < threshold
