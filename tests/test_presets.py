"""Augmentation presets (stored) and the paper's training presets."""

import pytest

from core.errors import UserError
from core.training import presets
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams


def test_presets_save_load_replace_delete(Session):
    with Session.begin() as s:
        assert presets.preset_names(s) == [presets.PAPER_PRESET]
        assert presets.get_params(s, presets.PAPER_PRESET) == AugmentParams()
        presets.save_preset(s, "  flips ", AugmentParams(flip_left_right_probability=0.5))
    with Session.begin() as s:
        assert presets.preset_names(s) == [presets.PAPER_PRESET, "flips"]
        assert presets.get_params(s, "flips").flip_left_right_probability == 0.5
        with pytest.raises(UserError, match="already exists"):
            presets.save_preset(s, "flips", AugmentParams())
        presets.save_preset(s, "flips", AugmentParams(rotate_probability=0.1), overwrite=True)
        assert presets.get_params(s, "flips") == AugmentParams(rotate_probability=0.1)
        for name in ("", presets.PAPER_PRESET):
            with pytest.raises(UserError):
                presets.save_preset(s, name, AugmentParams())
        presets.delete_preset(s, "flips")
        with pytest.raises(UserError, match="Known: Paper"):
            presets.get_params(s, "flips")


def test_training_presets_are_the_paper_settings():
    leaky = presets.training_preset("Reproduce the paper")
    honest = presets.training_preset("Paper settings, honest split")
    assert leaky["split"] == "paper-leaky" and honest["split"] == "holdout"
    for values in (leaky, honest):
        config = RunConfig(dataset="d", **values)
        assert (config.epochs, config.batch_size, config.lr, config.image_size, config.per_class) == (
            25,
            24,
            1e-4,
            224,
            1200,
        )
        assert config.weights == "imagenet" and config.augment_params == AugmentParams()
    with pytest.raises(UserError, match="choose one of"):
        presets.training_preset("fast")


def test_unseen_specimens_preset_is_grouped_cv_with_hed_jitter_and_no_imagenet():
    config = RunConfig(dataset="d", **presets.training_preset(presets.UNSEEN_SPECIMENS_CPU))
    assert (config.split, config.folds, config.grouped) == ("kfold", 5, True)
    assert config.hed_jitter == 0.05 and config.stain_normalisation == "none" and config.weights == "none"
    assert config.augment_params == AugmentParams()  # the paper's augmentation, at 64 px
    assert (config.image_size, config.per_class, config.epochs) == (64, 120, 8)
