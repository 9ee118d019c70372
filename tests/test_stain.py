"""Stain normalisation undoes a stain shift, and a fitted normaliser is rebuilt from its parameters;
HED jitter is seeded and keeps shape and dtype; Macenko and Reinhard agree with torchstain 1.4.1 where
the methods are the same, and differ from it only where ours does otherwise on purpose."""

import json

import numpy as np
import pytest
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from core.errors import UserError
from core.transforms.stain import (
    METHODS,
    MacenkoNormaliser,
    ReinhardNormaliser,
    hed_jitter,
    hed_to_rgb,
    make_normaliser,
    normaliser_from_params,
    rgb_to_hed,
)

H_REF, E_REF = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])


def he_image(h_vec=H_REF, e_vec=E_REF, h_amount=1.0, e_amount=1.0, size=96, seed=0) -> np.ndarray:
    """Synthetic H&E by Beer-Lambert: haematoxylin nuclei on eosin tissue, a strip of empty glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    h = np.zeros((size, size))
    for _ in range(25):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 8)
        h += 1.2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    e = (0.5 + 0.3 * np.sin(xx / 7) * np.cos(yy / 9)) * (1 - 0.8 * np.clip(h / 1.2, 0, 1))
    h[:, :10] = e[:, :10] = 0
    h += rng.normal(0, 0.03, h.shape)
    e += rng.normal(0, 0.03, e.shape)
    conc = np.stack([np.clip(h, 0, None) * h_amount, np.clip(e, 0, None) * e_amount], -1)
    vectors = np.stack([h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)])
    return np.clip(np.rint(255 * np.exp(-conc @ vectors)), 0, 255).astype(np.uint8)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


@pytest.fixture(scope="module")
def original():
    return he_image()


@pytest.mark.parametrize("method", METHODS)
def test_normalisation_maps_a_stain_shifted_copy_back(original, method):
    # Stronger haematoxylin, weaker eosin: the usual difference between two staining runs.
    shifted = hed_to_rgb(rgb_to_hed(original) * np.array([1.4, 0.6, 1.0]))
    before = mae(original, shifted)
    out = make_normaliser(method, original)(shifted)
    assert out.shape == original.shape and out.dtype == np.uint8
    assert before > 10
    assert mae(original, out) < 0.35 * before, (method, before, mae(original, out))


def test_macenko_also_undoes_other_stain_colours(original):
    # Other dyes (different stain vectors) in other amounts. Macenko re-estimates the vectors;
    # Reinhard, a global colour transfer, can only move the colour statistics and helps less.
    shifted = he_image(np.array([0.55, 0.80, 0.35]), np.array([0.20, 0.90, 0.20]), 1.3, 0.7)
    before = mae(original, shifted)
    macenko = mae(original, make_normaliser("macenko", original)(shifted))
    reinhard = mae(original, make_normaliser("reinhard", original)(shifted))
    assert macenko < 0.5 * before, (before, macenko)
    assert reinhard < 0.9 * before, (before, reinhard)


@pytest.mark.parametrize("method", METHODS)
def test_the_reference_maps_onto_itself(original, method):
    assert mae(original, make_normaliser(method, original)(original)) < 1.0


@pytest.mark.parametrize("method", METHODS)
def test_a_normaliser_is_rebuilt_from_its_parameters_without_the_reference(original, method):
    fitted = make_normaliser(method, original)
    params = json.loads(json.dumps(fitted.to_params()))  # as the model file stores them
    rebuilt = normaliser_from_params(params)
    shifted = he_image(h_amount=1.6, e_amount=0.6, seed=3)
    assert params["method"] == method and np.array_equal(rebuilt(shifted), fitted(shifted))
    with pytest.raises(UserError, match="macenko, reinhard"):
        normaliser_from_params({**params, "method": "vahadane"})


def test_macenko_leaves_an_image_without_tissue_unchanged(original):
    blank = np.full((32, 32, 3), 245, np.uint8)
    assert np.array_equal(make_normaliser("macenko", original)(blank), blank)
    with pytest.raises(UserError, match="too little stained tissue"):
        make_normaliser("macenko", blank)


def test_unknown_method_lists_the_allowed_ones(original):
    with pytest.raises(UserError, match="macenko, reinhard"):
        make_normaliser("vahadane", original)


def test_hed_round_trip_is_lossless_up_to_rounding(original):
    assert np.abs(hed_to_rgb(rgb_to_hed(original)).astype(int) - original).max() <= 1


def test_hed_jitter_is_seeded_and_keeps_shape_and_dtype(original):
    a = hed_jitter(original, np.random.default_rng(42))
    b = hed_jitter(original, np.random.default_rng(42))
    c = hed_jitter(original, np.random.default_rng(43))
    assert a.shape == original.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0 < mae(a, original) < 20  # a visible but mild change
    rng = np.random.default_rng(0)
    assert not np.array_equal(hed_jitter(original, rng), hed_jitter(original, rng))  # the generator advances
    assert np.array_equal(hed_jitter(original, 0, sigma=0, bias=0), original)
    assert mae(hed_jitter(original, 1, sigma=0.3, bias=0.2), original) > mae(hed_jitter(original, 1), original)


def test_hed_jitter_rejects_bad_input(original):
    with pytest.raises(UserError, match="sigma"):
        hed_jitter(original, 0, sigma=-0.1)
    with pytest.raises(ValueError, match="uint8"):
        hed_jitter(original.astype(np.float32), 0)


# ---------------------------------------------------------------------------------------------
# Against torchstain 1.4.1 (numpy backend, a test dependency only), with its parameters: Macenko
# Io=240, alpha=1, beta=0.15; Reinhard with torchstain's defaults.
#
# Where the methods are the same the results must be too: the same stain vectors and stain amounts,
# and images within a tolerance well under the shift undone. What differs is on purpose, as below:
#   Macenko   tissue is optical density of length >= beta, where torchstain wants every channel
#             >= beta and so drops pale eosin (it absorbs little red): its "eosin" is then a mixture
#             of H and E. What two stains cannot explain is kept, so the reference maps onto itself.
#             The output is the exact inverse of the optical density, Io * exp(-OD) - 1, rounded;
#             torchstain leaves out the -1 and truncates (within one unit). Tolerance: 2 units.
#   Reinhard  Ruderman's l-alpha-beta, as in Reinhard et al. (2001), where torchstain uses CIE L*a*b*;
#             statistics of tissue only, and empty glass left as it is: torchstain's statistics take
#             in the glass, so how much of the field is empty changes the colour of its tissue.
#             Tolerance, on tissue without glass: 4 units (the two colour spaces).

# The largest mean absolute difference from torchstain's image, in 0-255 units.
MACENKO_TOLERANCE, REINHARD_TOLERANCE = 2.0, 4.0
H_TS, E_TS = np.array([0.5626, 0.7201, 0.4062]), np.array([0.2159, 0.8012, 0.5581])  # torchstain's reference


def dense_he(h_vec=H_TS, e_vec=E_TS, h_amount=1.0, e_amount=1.0, glass=10, seed=0, size=96) -> np.ndarray:
    """Synthetic H&E stained throughout: every tissue pixel absorbs enough in each channel that
    torchstain's tissue test and ours pick the same pixels. A strip of `glass` columns is empty."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    h = rng.normal(0, 0.02, (size, size))
    for _ in range(25):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, 8)
        h += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    e = 1.4 + 0.2 * np.sin(xx / 7) * np.cos(yy / 9) + rng.normal(0, 0.02, h.shape)
    conc = np.stack([np.clip(h, 0, None) * h_amount, e * e_amount], -1)
    vectors = np.stack([h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)])
    image = np.clip(np.rint(255 * np.exp(-conc @ vectors)), 0, 255).astype(np.uint8)
    image[:, :glass] = 255
    return image


def degrees(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


# Other amounts of the same stains; other stains (other dyes) in other amounts.
SHIFTS = {
    "amounts": dict(h_amount=2.0, e_amount=0.85, seed=3),
    "dyes": dict(
        h_vec=np.array([0.65, 0.70, 0.29]), e_vec=np.array([0.30, 0.85, 0.45]), h_amount=1.2, e_amount=0.9, seed=5
    ),
}


@pytest.mark.parametrize("shift", SHIFTS)
def test_macenko_agrees_with_torchstain(shift):
    reference, image = dense_he(), dense_he(**SHIFTS[shift])
    theirs = NumpyMacenkoNormalizer()
    theirs.fit(reference, Io=240, alpha=1, beta=0.15)
    ours = MacenkoNormaliser(reference, io=240, alpha=1, beta=0.15)
    assert degrees(ours.stains[:, 0], theirs.HERef[:, 0]) < 0.1 and degrees(ours.stains[:, 1], theirs.HERef[:, 1]) < 0.1
    assert np.allclose(ours.max_conc, theirs.maxCRef, rtol=0.005)
    expected = theirs.normalize(image, Io=240, alpha=1, beta=0.15, stains=False)[0]
    assert mae(image, expected) > 2.5 * MACENKO_TOLERANCE  # the shift is there to be undone
    assert mae(ours(image), expected) < MACENKO_TOLERANCE, (shift, mae(ours(image), expected))


def test_macenko_finds_pale_eosin_that_torchstains_tissue_test_drops():
    # he_image's eosin is pale (0.1-0.8 optical density), and eosin absorbs little red.
    image = he_image()
    theirs = NumpyMacenkoNormalizer()
    theirs.fit(image, Io=240, alpha=1, beta=0.15)
    ours = MacenkoNormaliser(image, io=240, alpha=1, beta=0.15)
    assert degrees(ours.stains[:, 0], H_REF) < 2 and degrees(theirs.HERef[:, 0], H_REF) < 2
    assert degrees(ours.stains[:, 1], E_REF) < 6 < 15 < degrees(theirs.HERef[:, 1], E_REF)


@pytest.mark.parametrize("shift", SHIFTS)
def test_reinhard_agrees_with_torchstain_on_tissue_and_leaves_glass_out(shift):
    reference, image = dense_he(glass=0), dense_he(glass=0, **SHIFTS[shift])
    theirs = NumpyReinhardNormalizer()
    theirs.fit(reference)
    ours = ReinhardNormaliser(reference)
    expected = theirs.normalize(image)
    assert mae(image, expected) > 2.5 * REINHARD_TOLERANCE
    assert mae(ours(image), expected) < REINHARD_TOLERANCE, (shift, mae(ours(image), expected))
    # The same tissue beside a wide strip of empty glass: ours maps it as before, torchstain's does not.
    beside_glass = np.concatenate([np.full((96, 60, 3), 255, np.uint8), image], axis=1)
    assert np.array_equal(ours(beside_glass)[:, 60:], ours(image))
    assert mae(theirs.normalize(beside_glass)[:, 60:], expected) > 10
