"""H&E stain normalisation (Macenko, Reinhard) and stain augmentation (HED jitter), in NumPy.

Slides stained on different days or in different labs differ in colour; a model can learn the lab
instead of the lymphoma. Two remedies:

  normalise  map every image's colours onto one reference image's (fit once, apply to all):
             "macenko"  estimate each image's haematoxylin and eosin stain vectors in optical
                        density, unmix, rescale the stain amounts and re-mix with the reference's
                        vectors (Macenko et al., ISBI 2009)
             "reinhard" match the mean and spread of each channel in Ruderman's l-alpha-beta colour
                        space (Reinhard et al., IEEE CG&A 2001)
  jitter     during training, perturb the amount of each stain at random (Tellez et al. 2018):
             `hed_jitter` scales and shifts the H, E and DAB channels of the Ruifrok-Johnston
             colour deconvolution

All functions take and return HxWx3 uint8 RGB arrays. Own implementation rather than torchstain:
the algorithms are short, and this one fixes the eigenvector sign, counts pale eosin as tissue,
keeps what two stains cannot explain (so the reference maps onto itself), leaves empty glass out of
Reinhard's statistics and colours, and leaves an image without stained tissue unchanged instead of
failing. tests/test_stain.py checks both methods against torchstain 1.4.1: where the methods are
the same, so are the results (to a few units of 255).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from core.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")

# Ruifrok & Johnston (2001) stain optical-density vectors, rows H, E, DAB (as in scikit-image).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

Normaliser = Callable[[np.ndarray], np.ndarray]


def _check(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {a.shape} dtype {a.dtype}")
    return a


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Macenko


class MacenkoNormaliser:
    """Macenko normalisation to a reference image's stain vectors and stain amounts.

    Args:
        reference: the target appearance, HxWx3 uint8; needs some stained tissue.
        io: transmitted light intensity (the brightness of empty glass).
        beta: optical density (vector length) below which a pixel counts as background, ignored in fitting.
        alpha: percentile of the angle distribution taken as the extreme stain directions.
    """

    def __init__(self, reference: np.ndarray, *, io: float = 240.0, beta: float = 0.15, alpha: float = 1.0):
        self.io, self.beta, self.alpha = io, beta, alpha
        fitted = self._fit(_check(reference))
        if fitted is None:
            raise UserError(
                "The reference image has too little stained tissue to estimate H&E stain vectors; "
                "pick a reference with tissue in most of the field."
            )
        self.stains, self.max_conc = fitted  # (3, 2) unit columns H, E; (2,) 99th percentiles

    def to_params(self) -> dict[str, Any]:
        """What the fit found, JSON-ready: `from_params` rebuilds this normaliser without the reference."""
        return {
            "method": "macenko",
            "io": self.io,
            "beta": self.beta,
            "alpha": self.alpha,
            "stains": self.stains.tolist(),
            "max_conc": self.max_conc.tolist(),
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> MacenkoNormaliser:
        self = cls.__new__(cls)
        self.io, self.beta, self.alpha = float(params["io"]), float(params["beta"]), float(params["alpha"])
        self.stains = np.asarray(params["stains"], dtype=np.float64).reshape(3, 2)
        self.max_conc = np.asarray(params["max_conc"], dtype=np.float64).reshape(2)
        return self

    def _od(self, image: np.ndarray) -> np.ndarray:
        return -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / self.io)

    def _fit(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        od = self._od(image)
        # Tissue: optical density of at least beta in total. (The common "every channel >= beta"
        # drops pale eosin, whose red absorption is tiny, and so mistakes H+E mixtures for eosin.)
        tissue = od[(od > 0).all(1) & (np.linalg.norm(od, axis=1) >= self.beta)]
        if len(tissue) < 50:
            return None
        _, vecs = np.linalg.eigh(np.cov(tissue.T))
        plane = vecs[:, [2, 1]]  # the two directions of largest spread, largest first
        plane *= np.where(plane.sum(0) < 0, -1.0, 1.0)  # eigenvector signs are arbitrary: point into OD > 0
        proj = tissue @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [self.alpha, 100 - self.alpha])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        # Haematoxylin absorbs more red than eosin does: it is the vector with the larger R component.
        h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
        stains = np.clip(np.stack([h, e], axis=1), 1e-6, None)
        stains /= np.linalg.norm(stains, axis=0, keepdims=True)
        if abs(np.dot(stains[:, 0], stains[:, 1])) > 0.9999:  # one colour only: cannot unmix
            return None
        conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
        max_conc = np.percentile(conc, 99, axis=1)
        if (max_conc <= 1e-6).any():
            return None
        return stains, max_conc

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check(image)
        fitted = self._fit(image)
        if fitted is None:  # no stained tissue (empty glass, a blank tile): nothing to normalise
            return image.copy()
        stains, max_conc = fitted
        od = self._od(image).T  # (3, N)
        conc = np.linalg.lstsq(stains, od, rcond=None)[0]
        # What two stains cannot explain (noise, a third pigment) is kept as it is, so the
        # reference maps onto itself and fine detail outside the stain plane survives.
        residual = od - stains @ conc
        conc *= (self.max_conc / max_conc)[:, None]
        out = self.io * np.exp(-(self.stains @ conc + residual)) - 1
        return _to_uint8(out.T.reshape(image.shape))


# ---------------------------------------------------------------------------------------------
# Reinhard

_RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS_TO_RGB = np.linalg.inv(_RGB_TO_LMS)
_LOG_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64
)
_LAB_TO_LOG_LMS = np.linalg.inv(_LOG_LMS_TO_LAB)


def _rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> (N, 3) Ruderman l-alpha-beta."""
    rgb = (image.reshape(-1, 3).astype(np.float64) + 1) / 256  # in (0, 1], no log(0)
    lms = np.maximum(rgb @ _RGB_TO_LMS.T, 1e-6)
    return np.log10(lms) @ _LOG_LMS_TO_LAB.T


def _lab_to_rgb(lab: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    lms = 10 ** (lab @ _LAB_TO_LOG_LMS.T)
    return _to_uint8((lms @ _LMS_TO_RGB.T * 256 - 1).reshape(shape))


class ReinhardNormaliser:
    """Reinhard colour transfer: each l-alpha-beta channel of the tissue gets the reference tissue's
    mean and std.

    Statistics come from tissue pixels only (optical density >= `beta`) and only tissue is changed:
    empty glass would otherwise pull the statistics towards white by however much of the field it
    happens to fill, and would itself be tinted. An image with too little tissue uses all pixels.
    """

    def __init__(self, reference: np.ndarray, *, beta: float = 0.15):
        self.beta = beta
        lab, tissue = self._lab_and_tissue(_check(reference))
        self.mean, self.std = lab[tissue].mean(0), lab[tissue].std(0)

    def to_params(self) -> dict[str, Any]:
        """What the fit found, JSON-ready: `from_params` rebuilds this normaliser without the reference."""
        return {"method": "reinhard", "beta": self.beta, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ReinhardNormaliser:
        self = cls.__new__(cls)
        self.beta = float(params["beta"])
        self.mean = np.asarray(params["mean"], dtype=np.float64).reshape(3)
        self.std = np.asarray(params["std"], dtype=np.float64).reshape(3)
        return self

    def _lab_and_tissue(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lab = _rgb_to_lab(image)
        od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / 256)
        tissue = np.linalg.norm(od, axis=1) >= self.beta
        if tissue.sum() < 50:
            tissue[:] = True
        return lab, tissue

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check(image)
        lab, tissue = self._lab_and_tissue(image)
        mean, std = lab[tissue].mean(0), lab[tissue].std(0)
        scale = np.where(std > 1e-6, self.std / np.maximum(std, 1e-6), 1.0)  # a flat channel is only shifted
        out = image.reshape(-1, 3).copy()
        out[tissue] = _lab_to_rgb((lab[tissue] - mean) * scale + self.mean, (-1, 3))
        return out.reshape(image.shape)


def make_normaliser(method: str, reference: np.ndarray) -> MacenkoNormaliser | ReinhardNormaliser:
    """A callable mapping HxWx3 uint8 images to the reference's stain appearance.

    Args:
        method: "macenko" or "reinhard".
        reference: HxWx3 uint8 RGB image whose appearance every image is mapped to.

    Raises:
        UserError: an unknown method (the message lists the allowed ones), or a Macenko reference
            without enough stained tissue.
    """
    if method == "macenko":
        return MacenkoNormaliser(reference)
    if method == "reinhard":
        return ReinhardNormaliser(reference)
    raise UserError(f"Unknown stain normalisation {method!r}; choose one of {', '.join(METHODS)}.")


def normaliser_from_params(params: dict[str, Any]) -> MacenkoNormaliser | ReinhardNormaliser:
    """The normaliser whose `to_params()` gave `params` (its fitted values; no reference image needed)."""
    kinds = {"macenko": MacenkoNormaliser, "reinhard": ReinhardNormaliser}
    method = params.get("method")
    if method not in kinds:
        raise UserError(f"Unknown stain normalisation {method!r}; choose one of {', '.join(METHODS)}.")
    return kinds[method].from_params(params)


def mean_optical_density(image: np.ndarray) -> float:
    """Mean optical density of an HxWx3 uint8 image over all pixels and channels (0 for white glass)."""
    return float(-np.log((image.astype(np.float64) + 1) / 256).mean())


def choose_reference(
    arrays: Sequence[np.ndarray], ids: Sequence[int], method: str
) -> tuple[int, MacenkoNormaliser | ReinhardNormaliser]:
    """The stain-normalisation reference and its normaliser, from the given (training) images only.

    The reference is the image whose mean optical density is the median (a typical stain, neither
    the palest nor the darkest; ties go to the lower image id). If `method` cannot be fitted to it
    (Macenko needs enough stained tissue), the image next closest to the median is tried, and so on.
    Returns (image id, normaliser). Raises UserError when no image will do.
    """
    if not arrays:
        raise UserError("Stain normalisation needs at least one training image to take the reference from.")
    ranked = sorted(range(len(arrays)), key=lambda i: (mean_optical_density(arrays[i]), ids[i]))
    mid = (len(ranked) - 1) // 2
    order = sorted(range(len(ranked)), key=lambda r: (abs(r - mid), r))
    for r in order:
        i = ranked[r]
        try:
            return ids[i], make_normaliser(method, arrays[i])
        except UserError as exc:
            if "Unknown stain normalisation" in str(exc):
                raise
            log.info("stain reference: image %d does not fit %s (%s); trying the next", ids[i], method, exc)
    raise UserError(
        f"No training image has enough stained tissue to fit {method} stain normalisation; "
        "train without it (stain_normalisation='none')."
    )


# ---------------------------------------------------------------------------------------------
# Augmentation


def rgb_to_hed(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> HxWx3 stain amounts (H, E, DAB) in optical density units (natural log)."""
    image = _check(image)
    od = -np.log((image.astype(np.float64) + 1) / 256)  # white (255) -> 0
    return od @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hed`, clipped to uint8."""
    od = hed @ RGB_FROM_HED
    return _to_uint8(256 * np.exp(-od) - 1)


def hed_jitter(
    image: np.ndarray, rng: np.random.Generator | int | None, sigma: float = 0.05, bias: float = 0.05
) -> np.ndarray:
    """Random H&E stain variation: each stain channel s becomes s * a + b, a ~ U(1 - sigma, 1 + sigma),
    b ~ U(-bias, bias), one draw per image and channel (H, E, DAB).

    Args:
        image: HxWx3 uint8 RGB.
        rng: a numpy Generator (or a seed); the same generator state gives the same result.
        sigma: relative change of each stain's amount (0.05: +-5%).
        bias: absolute shift of each stain's optical density (natural-log units; stained tissue
            is roughly 0.3-1.5, so 0.05 is a mild shift that also tints empty glass slightly).
    Returns:
        A new HxWx3 uint8 image; sigma = bias = 0 returns the image unchanged.
    """
    if sigma < 0 or bias < 0:
        raise UserError(f"sigma and bias must be >= 0, got sigma={sigma}, bias={bias}.")
    image = _check(image)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    scale = rng.uniform(1 - sigma, 1 + sigma, 3)
    shift = rng.uniform(-bias, bias, 3)
    if sigma == 0 and bias == 0:
        return image.copy()
    return hed_to_rgb(rgb_to_hed(image) * scale + shift)
