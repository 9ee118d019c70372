"""Leak audit of a split: is anything in the test part a copy, or nearly a copy, of a training image?

Three checks, from certain to suggestive:

  exact   the same pixels (sha256 of the decoded array): an image stored twice under two names
  near    perceptual hash (pHash, 64 bits) within a Hamming distance of a training image: the same
          picture re-saved, re-compressed, brightened or slightly resized
  close   nearest training neighbour in a colour/texture feature space closer than almost any two
          training images are to each other (below the `percentile` of the training set's own
          nearest-neighbour distances): the same field of view, or a neighbouring one of one slide

`exact` and `near` hits are leaks. About `percentile`% of clean test images fall under the
`close` threshold by chance, so only many more than that is a warning; the ratio of median
nearest-neighbour distances (test->train over train->train) says whether the test images are as
close to the training set as training images are to one another (ratio near 1: same slides likely
on both sides) or further away (ratio well above 1: new slides).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image as PILImage

from core.store.records import LeakAudit

ImageLike = np.ndarray | PILImage.Image

HASH_SIZE = 8  # pHash: 8x8 lowest DCT frequencies of a 32x32 grey image -> 64 bits
DEFAULT_HASH_THRESHOLD = 10  # bits of 64; distinct H&E fields differ by ~20-40, re-saved copies by 0-6
DEFAULT_PERCENTILE = 1.0
FEATURE_SIZE = 128  # features are computed on a copy resized to at most this side


@dataclass
class LeakPair:
    test: str  # id of the test image
    train: str  # id of the training image it matches
    distance: float  # 0 (exact), Hamming bits (near) or standardised feature distance (close)


@dataclass
class AuditReport:
    n_train: int
    n_test: int
    exact: list[LeakPair]
    near: list[LeakPair]
    close: list[LeakPair]
    hash_threshold: int
    feature_threshold: float  # standardised distance under which a test image is "close"
    percentile: float
    nn_ratio: float  # median test->train NN distance / median train->train NN distance (nan if undefined)
    warning: str | None
    protocol: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def expected_close(self) -> float:
        """How many test images fall under the `close` threshold by chance alone."""
        return self.percentile / 100 * self.n_test

    @property
    def verdict(self) -> str:
        """The audit's finding in one plain sentence, for a page; `summary` has the technical terms."""
        if self.n_test == 0:
            return self.warning or f"No test images to check ({self.n_train} training images)."
        return leak_verdict(
            len({p.test for p in self.exact}),
            len({p.test for p in self.near}),
            len({p.test for p in self.close}),
            self.expected_close,
        )

    @property
    def summary(self) -> str:
        if self.n_test == 0:
            return f"No test images to audit ({self.n_train} training images)."
        expected = self.percentile / 100 * self.n_test
        ratio = "n/a" if not np.isfinite(self.nn_ratio) else f"{self.nn_ratio:.2f}"
        return (
            f"{self.n_test} test vs {self.n_train} training images: {_count(self.exact, 'exact duplicate')}, "
            f"{_count(self.near, 'near-duplicate')} (pHash distance <= {self.hash_threshold}), "
            f"{len({p.test for p in self.close})} suspiciously close in colour/texture "
            f"(about {expected:.1f} expected by chance); NN distance ratio test/train {ratio}."
        )

    def as_record(self) -> LeakAudit:
        """What a run keeps of its split's audit (its summary's record): the Runs page shows it."""
        return LeakAudit(
            n_test=self.n_test,
            exact=len({p.test for p in self.exact}),
            near=len({p.test for p in self.near}),
            close=len({p.test for p in self.close}),
            expected_close=round(self.expected_close, 2),
            nn_ratio=None if not np.isfinite(self.nn_ratio) else round(float(self.nn_ratio), 3),
            warning=self.warning,
            verdict=self.verdict,
            summary=self.summary,
        )


def _close_is_suspicious(n_close: int, expected: float) -> bool:
    """Chance alone puts about `percentile`% under the threshold; only clearly more is a warning."""
    return n_close >= 3 and n_close > 3 * expected


def _images(n: int, what: str) -> str:
    return f"{n} test image{'' if n == 1 else 's'} {'is' if n == 1 else 'are'} {what}"


def leak_verdict(exact: int, near: int, close: int, expected_close: float) -> str:
    """One plain sentence from the number of test images in each check: copies (same pixels or
    near-identical) are leaks; unusually close ones only when clearly more than chance gives."""
    close_text = (
        f"{_images(close, 'closer to a training image than usual')} (about {expected_close:.1f} expected by chance)"
    )
    copies = []
    if exact:
        copies.append(_images(exact, "the same as a training image"))
    if near:
        copies.append(_images(near, "near-identical to a training image (re-saved or slightly changed)"))
    if copies:
        also = f"; {close_text}" if close else ""
        return (
            f"Copies found between the training and test images: {'; '.join(copies)}{also}. "
            "Scores on this split are inflated."
        )
    none = "No copies found between the training and test images"
    if _close_is_suspicious(close, expected_close):
        return f"{none}, but {close_text}: the same slides may be on both sides, which inflates scores."
    if close:
        return f"{none}; {close_text}, too few to suggest a leak."
    return f"{none}, and no test image is unusually close to a training image."


def record_verdict(record: LeakAudit) -> str:
    """The verdict of a run's stored audit (`AuditReport.as_record`), also of one stored before
    records carried their verdict (its expected count from the default percentile)."""
    if record.verdict:
        return record.verdict
    if not record.n_test:
        return record.warning or "No test images to check."
    expected = DEFAULT_PERCENTILE / 100 * record.n_test if record.expected_close is None else record.expected_close
    return leak_verdict(record.exact, record.near, record.close, expected)


def _count(pairs: list[LeakPair], what: str) -> str:
    n = len({p.test for p in pairs})
    return f"{n} {what}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------
# Hashes and features


def _as_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, PILImage.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {a.shape} dtype {a.dtype}")
    return np.ascontiguousarray(a[:, :, :3])


def pixel_hash(image: ImageLike) -> str:
    """sha256 of the decoded pixels and their shape: equal for the same image in any file format."""
    a = _as_array(image)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m  # orthonormal DCT-II: dct(x) = m @ x


_DCT32 = _dct_matrix(32)


def phash(image: ImageLike) -> np.ndarray:
    """64-bit perceptual hash as a bool array: low-frequency DCT signs of a 32x32 grey copy
    (above/below their median). Robust to re-compression, small brightness changes and resizing."""
    grey = PILImage.fromarray(_as_array(image)).convert("L").resize((32, 32), PILImage.Resampling.LANCZOS)
    x = np.asarray(grey, dtype=np.float64)
    low = (_DCT32 @ x @ _DCT32.T)[:HASH_SIZE, :HASH_SIZE]
    return (low > np.median(low)).ravel()


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between the rows of bool arrays a (n, bits) and b (m, bits)."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    return a @ (1 - b).T + (1 - a) @ b.T


def _lbp_histogram(grey: np.ndarray) -> np.ndarray:
    """Rotation-invariant uniform LBP (8 neighbours, radius 1): 10-bin normalised histogram."""
    c = grey[1:-1, 1:-1]
    h, w = grey.shape
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]  # circular order
    bits = np.stack([grey[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] >= c for dy, dx in offsets]).astype(np.int8)
    transitions = np.abs(np.diff(np.concatenate([bits, bits[:1]]), axis=0)).sum(0)
    code = np.where(transitions <= 2, bits.sum(0), 9)  # 0..8 uniform patterns, 9 = the rest
    return np.bincount(code.ravel(), minlength=10) / code.size


def features(image: ImageLike) -> np.ndarray:
    """A small colour/texture descriptor (66 values): per-channel RGB means, stds and 12-bin
    histograms, an LBP histogram, gradient-magnitude statistics and an 8-bin orientation histogram."""
    a = _as_array(image)
    if max(a.shape[:2]) > FEATURE_SIZE:
        a = np.asarray(PILImage.fromarray(a).resize((FEATURE_SIZE, FEATURE_SIZE), PILImage.Resampling.BILINEAR))
    x = a.astype(np.float64) / 255
    colour = [x.mean((0, 1)), x.std((0, 1))]
    colour += [np.histogram(x[:, :, ch], bins=12, range=(0, 1))[0] / x[:, :, ch].size for ch in range(3)]
    grey = x @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)  # unsigned orientation
    orientation = np.histogram(angle, bins=8, range=(0, np.pi), weights=magnitude)[0]
    orientation = orientation / max(orientation.sum(), 1e-12)
    gradient = [magnitude.mean(), magnitude.std(), *np.percentile(magnitude, [50, 90])]
    return np.concatenate([*colour, _lbp_histogram(grey), gradient, orientation])


def _euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0))


# ---------------------------------------------------------------------------------------------
# The audit


def audit_images(
    train: Sequence[ImageLike],
    test: Sequence[ImageLike],
    train_ids: Sequence[str] | None = None,
    test_ids: Sequence[str] | None = None,
    *,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
    percentile: float = DEFAULT_PERCENTILE,
    protocol: str = "",
) -> AuditReport:
    """Audit test images against training images (uint8 HxWx3 arrays or PIL images).

    Args:
        train, test: the images; compare them at one size (e.g. the training size) for exact hits.
        train_ids, test_ids: names shown in the report (default: "train[i]", "test[i]").
        hash_threshold: largest pHash Hamming distance (of 64 bits) counted as a near-duplicate.
        percentile: a test image is "close" when its nearest training neighbour is nearer than
            this percentile of the training images' own nearest-neighbour distances.
        protocol: the split's description, carried into the report.
    """
    train_ids = list(train_ids) if train_ids is not None else [f"train[{i}]" for i in range(len(train))]
    test_ids = list(test_ids) if test_ids is not None else [f"test[{i}]" for i in range(len(test))]
    if len(train_ids) != len(train) or len(test_ids) != len(test):
        raise ValueError("one id per image is needed")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    train_a = [_as_array(im) for im in train]
    test_a = [_as_array(im) for im in test]
    exact: list[LeakPair] = []
    near: list[LeakPair] = []
    close: list[LeakPair] = []
    feature_threshold, nn_ratio = float("nan"), float("nan")
    notes: list[str] = []
    if train_a and test_a:
        exact, exact_tests = _exact_pairs(train_a, test_a, train_ids, test_ids)
        near = _near_pairs(train_a, test_a, train_ids, test_ids, hash_threshold, exact_tests)
        if len(train_a) >= 2:
            close, feature_threshold, nn_ratio = _close_pairs(
                train_a, test_a, train_ids, test_ids, percentile, exact_tests
            )
        else:
            notes.append("One training image: no nearest-neighbour distribution to compare with.")

    report = AuditReport(
        n_train=len(train_a),
        n_test=len(test_a),
        exact=exact,
        near=near,
        close=close,
        hash_threshold=hash_threshold,
        feature_threshold=feature_threshold,
        percentile=percentile,
        nn_ratio=nn_ratio,
        warning=None,
        protocol=protocol,
        notes=notes,
    )
    report.warning = _warning(report)
    return report


def _exact_pairs(train_a, test_a, train_ids, test_ids) -> tuple[list[LeakPair], set[int]]:
    """Test images with the same pixels as a training image, and which test images those are."""
    by_hash: dict[str, list[int]] = {}
    for j, a in enumerate(train_a):
        by_hash.setdefault(pixel_hash(a), []).append(j)
    exact, exact_tests = [], set()
    for i, a in enumerate(test_a):
        for j in by_hash.get(pixel_hash(a), []):
            exact.append(LeakPair(test_ids[i], train_ids[j], 0.0))
            exact_tests.add(i)
    return exact, exact_tests


def _near_pairs(train_a, test_a, train_ids, test_ids, hash_threshold: int, exact_tests: set[int]) -> list[LeakPair]:
    """Perceptual hash within the threshold (exact copies are not repeated here)."""
    hd = hamming(np.stack([phash(a) for a in test_a]), np.stack([phash(a) for a in train_a]))
    near = [
        LeakPair(test_ids[i], train_ids[j], float(hd[i, j]))
        for i, j in zip(*np.nonzero(hd <= hash_threshold))
        if i not in exact_tests
    ]
    return sorted(near, key=lambda p: (p.distance, p.test))


def _close_pairs(
    train_a, test_a, train_ids, test_ids, percentile: float, exact_tests: set[int]
) -> tuple[list[LeakPair], float, float]:
    """Feature-space nearest neighbours, standardised by the training set: test images nearer to a
    training image than `percentile` of the training images are to each other; also that threshold
    and the ratio of the median nearest-neighbour distances (test to train over train to train)."""
    f_train = np.stack([features(a) for a in train_a])
    f_test = np.stack([features(a) for a in test_a])
    mean, std = f_train.mean(0), f_train.std(0)
    std = np.where(std > 1e-9, std, 1.0)  # a constant feature carries no distance
    z_train, z_test = (f_train - mean) / std, (f_test - mean) / std
    scale = np.sqrt(f_train.shape[1])
    d_test = _euclidean(z_test, z_train) / scale
    nn_test = d_test.min(1)
    d_train = _euclidean(z_train, z_train) / scale
    np.fill_diagonal(d_train, np.inf)
    nn_train = d_train.min(1)
    threshold = float(np.percentile(nn_train, percentile))
    nn_ratio = float(np.median(nn_test) / np.median(nn_train)) if np.median(nn_train) > 0 else float("nan")
    close = [
        LeakPair(test_ids[i], train_ids[int(d_test[i].argmin())], float(nn_test[i]))
        for i in np.flatnonzero(nn_test < threshold)
        if i not in exact_tests
    ]
    return sorted(close, key=lambda p: p.distance), threshold, nn_ratio


def _warning(report: AuditReport) -> str | None:
    problems = []
    if report.exact:
        problems.append(f"{_count(report.exact, 'test image')} exactly equal to a training image")
    if report.near:
        problems.append(
            f"{_count(report.near, 'test image')} nearly equal to a training image "
            "(a re-saved or slightly changed copy)"
        )
    n_close = len({p.test for p in report.close})
    expected = report.expected_close
    if _close_is_suspicious(n_close, expected):
        problems.append(
            f"{n_close} test images closer to a training image than "
            f"{100 - report.percentile:g}% of training images are to each other "
            f"(about {expected:.1f} expected by chance)"
        )
    if not problems:
        return None
    return "Possible leak: " + "; ".join(problems) + ". Scores on this split may be inflated."


def format_audit(report: AuditReport, max_rows: int = 15) -> str:
    """The report as Markdown: summary, warning, thresholds and the matched pairs."""
    lines = []
    if report.protocol:
        lines.append(f"Split: {report.protocol}")
        lines.append("")
    lines.append(report.summary)
    lines.append("")
    lines.append(
        f"**Warning:** {report.warning}" if report.warning else f"No leak found by these checks. {report.verdict}"
    )
    for note in report.notes:
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        "| check | rule | test images flagged |",
        "| --- | --- | --- |",
        f"| exact | same pixels (sha256) | {len({p.test for p in report.exact})} |",
        f"| near | pHash Hamming distance <= {report.hash_threshold} of 64 bits | {len({p.test for p in report.near})} |",
        f"| close | colour/texture NN distance < {report.feature_threshold:.3f} "
        f"(percentile {report.percentile:g} of train-train NN distances) | {len({p.test for p in report.close})} |",
    ]
    if np.isfinite(report.nn_ratio):
        lines += [
            "",
            f"Median nearest-training-neighbour distance of a test image / of a training image: "
            f"{report.nn_ratio:.2f}. Near 1, test images are as close to the training set as training "
            "images are to each other, as when the same slides are on both sides (or when images are "
            "independent); well above 1, the test images look new, as expected of unseen specimens.",
        ]
    for title, pairs, unit in (
        ("Exact duplicates", report.exact, ""),
        ("Near-duplicates", report.near, "Hamming bits"),
        ("Suspiciously close", report.close, "feature distance"),
    ):
        if not pairs:
            continue
        lines += ["", f"{title}:", "", f"| test image | training image | {unit or 'distance'} |", "| --- | --- | --- |"]
        for p in pairs[:max_rows]:
            lines.append(f"| {p.test} | {p.train} | {p.distance:.3g} |")
        if len(pairs) > max_rows:
            lines.append(f"| ... and {len(pairs) - max_rows} more | | |")
    return "\n".join(lines)


def audit_split(session, settings, split, fold: int = 0, image_size: int = 128, **kwargs) -> AuditReport:
    """Audit a stored split's test part against its training and validation parts (all the
    images the model sees or is selected on), decoded and resized to `image_size`.

    A paper-leaky split has no test part before augmentation; its report says so in the warning.
    Extra keyword arguments go to `audit_images`.
    """
    from core.data import splits

    return audit_parts(settings, split, splits.split_parts(session, split, fold), image_size, **kwargs)


def audit_parts(settings, split, parts: dict, image_size: int = 128, **kwargs) -> AuditReport:
    """`audit_split` of one fold whose images by part (`parts`) are loaded already; reads no database."""
    from core.data import cache, splits  # torch-importing modules; keep `import core.data.audit` light

    protocol = splits.describe(split)
    if split.protocol == "paper-leaky":
        n = len(parts.get("pool", []))
        return AuditReport(
            n_train=n,
            n_test=0,
            exact=[],
            near=[],
            close=[],
            hash_threshold=kwargs.get("hash_threshold", DEFAULT_HASH_THRESHOLD),
            feature_threshold=float("nan"),
            percentile=kwargs.get("percentile", DEFAULT_PERCENTILE),
            nn_ratio=float("nan"),
            protocol=protocol,
            warning="Leaky by construction: every image is augmented first and the copies are split, so "
            "augmented copies of each test image are in training.",
        )
    seen = parts.get("train", []) + parts.get("val", [])
    test = parts.get("test", [])
    return audit_images(
        [cache.resized_array(settings, im, image_size) for im in seen],
        [cache.resized_array(settings, im, image_size) for im in test],
        [im.original_name for im in seen],
        [im.original_name for im in test],
        protocol=protocol,
        **kwargs,
    )
