import numpy as np
import pytest

from core.data.splits import assign_parts
from core.errors import UserError


def _labels_groups(n_groups_per_class=8, per_group=4, classes=("CLL", "FL", "MCL")):
    labels, groups = [], []
    for c in classes:
        for g in range(n_groups_per_class):
            for _ in range(per_group):
                labels.append(c)
                groups.append(f"{c}-{g}")
    return labels, groups


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_holdout_is_disjoint_stratified_and_grouped(grouped, seed):
    labels, groups = _labels_groups()
    (parts,) = assign_parts(
        labels, groups if grouped else None, protocol="holdout", seed=seed, test_fraction=0.2, val_fraction=0.15
    )
    parts = np.array(parts)
    assert set(parts) == {"train", "val", "test"}
    for label in set(labels):
        members = np.array(labels) == label
        assert 0.1 < (parts[members] == "test").mean() < 0.35  # about 20% of every class
        assert (parts[members] == "train").sum() > 0
    if grouped:
        g = np.array(groups)
        for group in set(groups):
            assert len(set(parts[g == group])) == 1, f"group {group} on two sides"


@pytest.mark.parametrize("grouped", [False, True])
def test_kfold_tests_partition_the_data_and_keep_groups_together(grouped):
    labels, groups = _labels_groups(n_groups_per_class=10)
    folds = assign_parts(labels, groups if grouped else None, protocol="kfold", seed=3, folds=5, val_fraction=0.1)
    assert len(folds) == 5
    test_count = np.zeros(len(labels), int)
    for parts in folds:
        parts = np.array(parts)
        test_count += parts == "test"
        if grouped:
            g = np.array(groups)
            for group in set(groups):
                assert len(set(parts[g == group])) == 1
    assert (test_count == 1).all()  # every image is tested exactly once


def test_split_is_reproducible_and_seed_dependent():
    labels, groups = _labels_groups()
    a = assign_parts(labels, groups, protocol="holdout", seed=5)
    b = assign_parts(labels, groups, protocol="holdout", seed=5)
    c = assign_parts(labels, groups, protocol="holdout", seed=6)
    assert a == b
    assert a != c


def test_paper_leaky_puts_everything_in_the_pool():
    labels, _ = _labels_groups()
    (parts,) = assign_parts(labels, None, protocol="paper-leaky", seed=0)
    assert set(parts) == {"pool"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"protocol": "random"}, "choose one of"),
        ({"protocol": "holdout", "test_fraction": 1.5}, "test fraction"),
        ({"protocol": "kfold", "folds": 50}, "at least 50"),
        ({"protocol": "kfold", "folds": 1}, "at least 2 folds"),
    ],
)
def test_bad_split_settings_are_user_errors(kwargs, message):
    labels, groups = _labels_groups()
    with pytest.raises(UserError, match=message):
        assign_parts(labels, groups, seed=0, **kwargs)


def test_a_class_with_one_group_cannot_be_split():
    labels = ["A"] * 4 + ["B"] * 4
    groups = ["a1"] * 4 + ["b1", "b1", "b2", "b2"]
    with pytest.raises(UserError, match="Class 'A' has 1 groups"):
        assign_parts(labels, groups, protocol="holdout", seed=0)
