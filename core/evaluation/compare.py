"""Two models scored on the same test images: is one better, or is the gap within noise?

With some 50 test images, 59.6% against 53.8% is three images: the kind of gap a different draw of
test images could reverse. So a comparison is made on the images both models were scored on
(paired), with a bootstrap interval of the difference in accuracy (resampling images, or whole
specimens where groups are known) and McNemar's exact test on the images only one model got right.
A sentence says "better" only when the interval excludes zero.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from math import comb

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class PairedComparison:
    """Accuracy of A minus accuracy of B on the `n` images both were scored on."""

    n: int
    accuracy_a: float
    accuracy_b: float
    low: float  # the difference's bootstrap interval at `level`
    high: float
    p_value: float  # McNemar's exact test: could the images only one got right have split this way by chance?
    only_a: int  # images A got right and B wrong
    only_b: int
    level: float = LEVEL
    groups: int | None = None  # specimens resampled whole; None: images one by one

    @property
    def difference(self) -> float:
        return self.accuracy_a - self.accuracy_b

    @property
    def within_noise(self) -> bool:
        return self.low <= 0 <= self.high

    def verdict(self, a: str, b: str) -> str:
        """One sentence, e.g. 'run 4 scores 5.8 points above run 3 on the same 52 test images, within
        noise (95% interval -7.7 to +19.2 points)'."""
        gap = f"{abs(self.difference) * 100:.1f} points {'above' if self.difference >= 0 else 'below'}"
        if self.difference == 0:
            gap = "the same as"
        unit = f"{self.groups} specimens resampled whole" if self.groups else "images resampled"
        interval = (
            f"{self.level:.0%} interval {self.low * 100:+.1f} to {self.high * 100:+.1f} points, "
            f"{unit}; McNemar p = {self.p_value:.2g}"
        )
        where = f"on the same {self.n} test images"
        if self.within_noise:
            return f"{a} scores {gap} {b} {where}: within noise ({interval})."
        better = "better" if self.difference > 0 else "worse"
        return f"{a} scores {gap} {b} {where}: {better} beyond noise ({interval})."


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of the discordant pairs against 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(
    correct_a: Mapping[Hashable, bool],
    correct_b: Mapping[Hashable, bool],
    *,
    groups: Mapping[Hashable, Hashable] | None = None,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedComparison | None:
    """Compare two models on the images both were scored on (keys of both mappings: image -> right?).
    With `groups` (image -> specimen), whole specimens are resampled. None when no image is shared."""
    shared = [k for k in correct_a if k in correct_b]
    if not shared:
        return None
    a = np.array([bool(correct_a[k]) for k in shared])
    b = np.array([bool(correct_b[k]) for k in shared])
    diff = a.astype(float) - b.astype(float)
    if groups is None:
        group_of = np.arange(len(shared))
    else:
        index = {g: i for i, g in enumerate(dict.fromkeys(groups.get(k, k) for k in shared))}
        group_of = np.array([index[groups.get(k, k)] for k in shared])
    n_groups = int(group_of.max()) + 1
    sums, counts = np.bincount(group_of, diff, n_groups), np.bincount(group_of, minlength=n_groups)
    draws = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=resamples)
    samples = (draws @ sums) / (draws @ counts)
    low, high = np.percentile(samples, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return PairedComparison(
        len(shared),
        float(a.mean()),
        float(b.mean()),
        float(low),
        float(high),
        mcnemar_exact(only_a, only_b),
        only_a,
        only_b,
        level,
        n_groups if groups is not None else None,
    )


@dataclass(frozen=True)
class FoldSpread:
    """The folds of a k-fold experiment, each scored on its own test images: do their accuracies
    differ by more than the draw of those images would make them? Folds share no test image, so
    the test is not paired: a permutation test of equal accuracy (the right/wrong marks shuffled
    across folds keeping each fold's size), with the chi-square statistic of the folds x
    right/wrong table. Exact enough at any count, unlike the chi-square table it borrows from."""

    accuracies: tuple[float, ...]
    sizes: tuple[int, ...]
    p_value: float
    level: float = LEVEL

    @property
    def within_noise(self) -> bool:
        return self.p_value >= 1 - self.level

    def verdict(self) -> str:
        """One sentence, e.g. 'The 5 folds score 48.0% to 70.0% on their own test images (25 to 26
        each): within noise, a gap this size comes from the draw of test images alone (permutation
        test, p = 0.41).'"""
        low, high = min(self.accuracies), max(self.accuracies)
        sizes = (
            f"{min(self.sizes)}" if min(self.sizes) == max(self.sizes) else f"{min(self.sizes)} to {max(self.sizes)}"
        )
        head = f"The {len(self.accuracies)} folds score {low:.1%} to {high:.1%} on their own test images ({sizes} each)"
        test = f"permutation test of equal accuracy, p = {self.p_value:.2g}"
        if self.within_noise:
            return f"{head}: within noise, a gap this size comes from the draw of test images alone ({test})."
        return (
            f"{head}: they differ beyond noise ({test}), so the folds' test parts are not alike; "
            "read the mean with its spread."
        )


def _chi_square(right: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Chi-square statistic of each row of per-fold right counts (shape draws x folds)."""
    share = right.sum(axis=-1, keepdims=True) / sizes.sum()
    expected_right, expected_wrong = sizes * share, sizes * (1 - share)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (right - expected_right) ** 2 / expected_right + (
            (sizes - right) - expected_wrong
        ) ** 2 / expected_wrong
    return np.nan_to_num(terms, nan=0.0, posinf=0.0).sum(axis=-1)


def fold_spread(
    right: list[int], sizes: list[int], *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> FoldSpread | None:
    """Compare the folds' accuracies (`right[i]` of `sizes[i]` test images right in fold i). None
    with fewer than two folds scored."""
    if len(sizes) < 2 or min(sizes) < 1:
        return None
    sizes_a, right_a = np.array(sizes), np.array(right, dtype=float)
    marks = np.repeat([1.0, 0.0], [int(right_a.sum()), int(sizes_a.sum() - right_a.sum())])
    edges = np.cumsum(sizes_a)[:-1]
    rng = np.random.default_rng(seed)
    shuffled = np.array([np.add.reduceat(rng.permutation(marks), np.r_[0, edges]) for _ in range(resamples)])
    seen = _chi_square(right_a, sizes_a)
    p_value = (1 + int((_chi_square(shuffled, sizes_a) >= seen - 1e-12).sum())) / (resamples + 1)
    return FoldSpread(tuple(float(r / n) for r, n in zip(right, sizes)), tuple(sizes), float(p_value), level)
