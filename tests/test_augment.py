from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import Augmentor
import numpy as np
import pytest
from Augmentor.ImageUtilities import AugmentorImage

from core.errors import UserError
from core.transforms import augment as augment_module
from core.transforms.augment import AugmentParams, augment, build_operations, expand, preview
from tests.synthetic import synthetic_image

PAPER_OPS = ("rotate", "distortion", "zoom")
N_RATE = 3000


def _params(p: float, **extra) -> AugmentParams:
    return AugmentParams(rotate_probability=p, distortion_probability=p, zoom_probability=p, **extra)


def _firing_rates(params: AugmentParams, n: int = N_RATE) -> Counter:
    # Tiny images: the rate depends only on the draws, and 3000 samples stay fast.
    image = synthetic_image("CLL", 0, (16, 16))
    ops = build_operations(params)
    counts = Counter()
    for seed in range(n):
        counts.update(augment(image, ops, seed)[1])
    return counts


def test_paper_defaults_fire_at_their_set_probability():
    counts = _firing_rates(AugmentParams())
    for name, p in {"rotate": 0.4, "distortion": 0.4, "zoom": 0.2}.items():
        assert abs(counts[name] / N_RATE - p) <= 0.03, (name, counts[name] / N_RATE)


@pytest.mark.parametrize("p", [0.1, 0.55, 0.75])
def test_other_probabilities_fire_at_their_set_rate(p):
    counts = _firing_rates(_params(p))
    for name in PAPER_OPS:
        assert abs(counts[name] / N_RATE - p) <= 0.03, (name, counts[name] / N_RATE)


def test_augmentors_own_rounding_would_miss_the_set_probability():
    """Why we don't use Pipeline.sample(): it fires when round(uniform(0, 1), 1) <= p."""
    rng = random.Random(0)
    rate = sum(round(rng.uniform(0, 1), 1) <= 0.4 for _ in range(100_000)) / 100_000
    assert abs(rate - 0.45) < 0.01  # 0.4 is really ~0.45

    # The same through Augmentor's own sample() code path, with a zoom that always changes the image.
    image = synthetic_image("CLL", 0, (16, 16))
    pipeline = Augmentor.Pipeline()
    pipeline.zoom_random(0.4, 0.5)
    original = np.asarray(image)
    state = random.getstate()
    random.seed(0)
    try:
        outputs = (
            pipeline._execute(AugmentorImage(None, None, pil_images=image), save_to_disk=False) for _ in range(2000)
        )
        fired = sum(not np.array_equal(np.asarray(out), original) for out in outputs)
    finally:
        random.setstate(state)
    assert fired / 2000 > 0.43


def test_probability_zero_never_fires_and_one_always_fires():
    assert build_operations(_params(0.0)) == []
    assert sum(_firing_rates(_params(0.0), n=200).values()) == 0
    extras = dict(flip_left_right_probability=1.0, flip_top_bottom_probability=1.0, rotate90_probability=1.0)
    counts = _firing_rates(_params(1.0, **extras), n=200)
    assert counts == Counter({name: 200 for name in (*PAPER_OPS, "flip_left_right", "flip_top_bottom", "rotate90")})


@pytest.mark.parametrize("size", [(64, 48), (224, 224)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_output_keeps_input_size_and_is_rgb(size, mode):
    image = synthetic_image("FL", 1, size).convert(mode)
    ops = build_operations(_params(1.0, rotate90_probability=1.0))  # 90 degrees swaps a non-square's sides
    for seed in range(5):
        out, _ = augment(image, ops, seed)
        assert out.size == size and out.mode == "RGB"


@pytest.mark.parametrize("name", PAPER_OPS)
def test_a_fired_op_changes_the_image(name):
    kwargs = {f"{op}_probability": 0.0 for op in PAPER_OPS} | {f"{name}_probability": 1.0}
    if name == "rotate":  # a 3-degree range includes 0 degrees; a wider one makes a no-op rare
        kwargs |= dict(rotate_max_left=10, rotate_max_right=10)
    image = synthetic_image("MCL", 2, (64, 64))
    ops = build_operations(AugmentParams(**kwargs))
    changed = 0
    for seed in range(20):
        out, fired = augment(image, ops, seed)
        assert fired == [name]
        changed += not np.array_equal(np.asarray(out), np.asarray(image))
    assert changed >= (15 if name == "rotate" else 20)


def test_augment_is_deterministic_and_leaves_global_random_state_alone():
    image = synthetic_image("CLL", 3)
    ops = build_operations(_params(1.0))
    random.seed(123)
    np.random.seed(123)
    expected = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    a, _ = augment(image, ops, 7)
    b, _ = augment(image, ops, 7)
    c, _ = augment(image, ops, 8)
    assert (random.random(), np.random.rand()) == expected
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def _class_images() -> tuple[list, list[int]]:
    images, labels = [], []
    for label, (name, n) in enumerate([("CLL", 3), ("FL", 5), ("MCL", 7)]):
        images += [synthetic_image(name, i, (32, 24)) for i in range(n)]
        labels += [label] * n
    return images, labels


def test_expand_makes_exactly_per_class_images_from_balanced_sources():
    images, labels = _class_images()
    progress = []
    out, out_labels, sources = expand(
        images, labels, 11, AugmentParams(), seed=0, progress=lambda done, total: progress.append((done, total))
    )
    assert len(out) == len(out_labels) == len(sources) == 33
    assert Counter(out_labels) == {0: 11, 1: 11, 2: 11}
    assert all(labels[s] == l for s, l in zip(sources, out_labels))
    for label in range(3):
        uses = Counter(s for s, l in zip(sources, out_labels) if l == label)
        members = [i for i, l in enumerate(labels) if l == label]
        assert set(uses) == set(members)  # per_class > n here, so every source is used
        assert max(uses.values()) - min(uses.values()) <= 1
    assert all(im.size == (32, 24) and im.mode == "RGB" for im in out)
    assert progress[-1] == (33, 33) and len(progress) == 33


def test_expand_is_deterministic_for_a_seed_and_differs_for_another():
    images, labels = _class_images()
    a = expand(images, labels, 6, AugmentParams(), seed=1)
    b = expand(images, labels, 6, AugmentParams(), seed=1)
    c = expand(images, labels, 6, AugmentParams(), seed=2)
    assert a[1:] == b[1:]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[0], b[0]))
    assert sum(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[0], c[0])) > 9


def test_expand_rejects_bad_requests():
    images, labels = _class_images()
    with pytest.raises(UserError, match="at least 1"):
        expand(images, labels, 0, AugmentParams(), seed=0)
    with pytest.raises(UserError, match="Class"):
        expand(images[:3], [0, 0, 2], 4, AugmentParams(), seed=0)
    with pytest.raises(UserError, match="3"):
        expand(images, labels, 4, AugmentParams(), seed=0, num_classes=4)


def test_preview_gives_n_versions_with_fired_names():
    result = preview(synthetic_image("FL", 0), AugmentParams(), n=6, seed=0)
    assert len(result) == 6
    assert all(im.size == (64, 48) and set(names) <= set(PAPER_OPS) for im, names in result)
    with pytest.raises(UserError):
        preview(synthetic_image("FL", 0), AugmentParams(), n=0, seed=0)


def test_params_round_trip_and_reject_unknown_keys():
    params = AugmentParams(rotate_probability=0.3, zoom_percentage_area=0.8)
    assert AugmentParams.from_dict(params.to_dict()) == params
    assert AugmentParams.from_dict({}) == AugmentParams()
    with pytest.raises(UserError, match="bogus.*allowed: rotate_probability, .*rotate90_probability"):
        AugmentParams.from_dict({"bogus": 1})
    with pytest.raises(TypeError):
        AugmentParams(0.4)  # keyword-only


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rotate_probability", 1.5, "between 0 and 1"),
        ("zoom_probability", -0.1, "between 0 and 1"),
        ("rotate_max_left", 30, "0 to 25"),
        ("rotate_max_right", 2.5, "0 to 25"),
        ("distortion_grid_width", 0, "from 1 to 64"),
        ("distortion_grid_width", 65, "from 1 to 64"),
        ("distortion_magnitude", -1, "from 0 to 64"),
        ("zoom_percentage_area", 0.05, "at least 0.1 and less than 1"),
        ("zoom_percentage_area", 1.0, "at least 0.1 and less than 1"),
        ("distortion_probability", "high", "must be a number"),
        ("flip_left_right_probability", float("nan"), "must be a number"),
    ],
)
def test_params_reject_out_of_range_values(key, value, message):
    with pytest.raises(UserError, match=message) as info:
        AugmentParams.from_dict({key: value})
    assert key in str(info.value)


def test_expand_in_worker_processes_gives_the_same_images(monkeypatch):
    pools = []

    class Pool(ProcessPoolExecutor):  # the real pool, recording that it was started and how
        def __init__(self, *args, **kwargs):
            pools.append(kwargs["mp_context"].get_start_method())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(augment_module, "ProcessPoolExecutor", Pool)
    images = [synthetic_image(c, i, (16, 16)) for c in ("CLL", "FL") for i in range(3)]
    labels = [0] * 3 + [1] * 3
    # 2 x 64 samples: enough for expand to start its two processes rather than work alone.
    one = expand(images, labels, 64, _params(1.0), seed=4)
    many = expand(images, labels, 64, _params(1.0), seed=4, workers=2)
    assert pools == ["spawn"]  # beside torch's threads only spawned processes are safe
    assert one[1] == many[1] and one[2] == many[2]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one[0], many[0]))
