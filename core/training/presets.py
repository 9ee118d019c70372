"""Named settings: augmentation presets (stored, user-made) and the paper's training setup.

The paper's augmentation is always available under PAPER_PRESET and cannot be overwritten; users
save their own variants in the augmentation_presets table. A run copies a preset's values into its
config, so editing or deleting a preset later never changes a recorded run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.limits import check_name_length
from core.errors import UserError
from core.store.db import AugmentationPreset
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams

PAPER_PRESET = "Paper (Hasan et al.)"


def list_presets(session: Session) -> list[AugmentationPreset]:
    """Saved presets, by name (the built-in paper preset is not stored)."""
    return list(session.scalars(select(AugmentationPreset).order_by(AugmentationPreset.name)))


def preset_names(session: Session) -> list[str]:
    """Every preset a run can use, the paper's first."""
    return [PAPER_PRESET, *(p.name for p in list_presets(session))]


def get_params(session: Session, name: str) -> AugmentParams:
    """The augmentation settings of preset `name`; UserError naming the known presets if unknown."""
    if name == PAPER_PRESET:
        return AugmentParams()
    preset = session.scalar(select(AugmentationPreset).where(AugmentationPreset.name == name))
    if preset is None:
        raise UserError(f"No augmentation preset named '{name}'. Known: {', '.join(preset_names(session))}.")
    return AugmentParams.from_dict(preset.params)


def preset_holding(session: Session, params: dict[str, Any]) -> str | None:
    """The preset whose values are `params` (the paper's first, then by name), or None when no
    preset holds them (any more)."""
    wanted = AugmentParams.from_dict(params)
    return next((name for name in preset_names(session) if get_params(session, name) == wanted), None)


def save_preset(session: Session, name: str, params: AugmentParams, *, overwrite: bool = False) -> AugmentationPreset:
    """Store `params` under `name`. An existing name is replaced only with overwrite=True."""
    name = name.strip()
    if not name:
        raise UserError("Give the preset a name.")
    check_name_length(name, "Preset name")
    if name == PAPER_PRESET:
        raise UserError(f"'{PAPER_PRESET}' is the built-in paper preset; choose another name.")
    preset = session.scalar(select(AugmentationPreset).where(AugmentationPreset.name == name))
    if preset is not None and not overwrite:
        raise UserError(f"A preset named '{name}' already exists; tick 'replace' to overwrite it.")
    if preset is None:
        preset = AugmentationPreset(name=name, params=params.to_dict())
        session.add(preset)
    else:
        preset.params = params.to_dict()
    session.flush()
    return preset


def delete_preset(session: Session, name: str) -> None:
    preset = session.scalar(select(AugmentationPreset).where(AugmentationPreset.name == name))
    if preset is None:
        raise UserError(f"No augmentation preset named '{name}'.")
    session.delete(preset)
    session.flush()


# Plain words for each augmentation setting, for tables and summaries that show a preset's values
# (a page shows these, never the field names).
AUGMENT_LABELS: dict[str, str] = {
    "rotate_probability": "Chance of rotating",
    "rotate_max_left": "Rotate left by at most (°)",
    "rotate_max_right": "Rotate right by at most (°)",
    "distortion_probability": "Chance of distorting",
    "distortion_grid_width": "Distortion grid width",
    "distortion_grid_height": "Distortion grid height",
    "distortion_magnitude": "Distortion strength",
    "zoom_probability": "Chance of zooming in",
    "zoom_percentage_area": "Share of the area kept when zooming",
    "flip_left_right_probability": "Chance of flipping left-right",
    "flip_top_bottom_probability": "Chance of flipping top-bottom",
    "rotate90_probability": "Chance of rotating by 90°",
}
# The operations core.transforms.augment reports as fired (preview captions), in plain words.
OPERATION_LABELS: dict[str, str] = {
    "rotate": "Rotate",
    "distortion": "Distort",
    "zoom": "Zoom",
    "flip_left_right": "Flip left-right",
    "flip_top_bottom": "Flip top-bottom",
    "rotate90": "Rotate by 90°",
}


def labelled(params: dict[str, Any]) -> dict[str, Any]:
    """An augmentation preset's values keyed by their plain labels, in AugmentParams' order."""
    return {AUGMENT_LABELS[name]: value for name, value in AugmentParams.from_dict(params).to_dict().items()}


def augmentation_words(values: dict[str, Any]) -> list[str]:
    """The operations a preset's values apply, each in a few plain words (those with no chance left out)."""
    params = AugmentParams.from_dict(values)
    words = []
    if params.rotate_probability:
        words.append(
            f"rotate {params.rotate_probability:.0%} of images, up to {params.rotate_max_left}° left "
            f"or {params.rotate_max_right}° right"
        )
    if params.distortion_probability:
        words.append(
            f"distort {params.distortion_probability:.0%} (grid {params.distortion_grid_width}×"
            f"{params.distortion_grid_height}, strength {params.distortion_magnitude})"
        )
    if params.zoom_probability:
        words.append(f"zoom in on {params.zoom_probability:.0%}, keeping {params.zoom_percentage_area:.0%} of the area")
    for name in ("flip_left_right", "flip_top_bottom", "rotate90"):
        chance = getattr(params, f"{name}_probability")
        if chance:
            words.append(f"{OPERATION_LABELS[name].lower()} {chance:.0%}")
    return words or ["no operation: every augmented image is a copy"]


# Training setups offered as one-click buttons. Everything not named is RunConfig's default,
# which is the paper's (core/paper.py's PAPER), so the two paper presets read that one source.
# Their names say what they are for; figures measured with them belong in their help (with where
# they come from), since a figure from one dataset is no promise for another.
# No figure in the name: how long it takes is the Train page's estimate, from this machine's own runs,
# so that the button and the estimate beside it never disagree.
QUICK_TRY = "Try it on this machine (a first run on the CPU)"
PAPER_LEAKY = "Reproduce the paper"
PAPER_HONEST = "Paper settings, honest split"
# The best of the configurations compared by grouped 5-fold CV on the development images
# (docs/generalisation.md), at the reduced CPU settings it was measured with.
UNSEEN_SPECIMENS_CPU = "Unseen specimens: HED jitter, grouped 5-fold (CPU)"
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    # A first run on 2 CPU cores with the 256 development images: 64 px, 3 x 200 augmented images,
    # at most 3 epochs. Measured on the development machine's 2 idle cores (2026-12-02) with 120 per
    # class: 24 images/s, 47 s of training and 92 s from the command to the result; at 200 per class
    # that makes about 2 minutes, and about 5 where other work shares the cores. The weights stay
    # the site's (DEFAULT_WEIGHTS): the paper's ImageNet weights where they can be had.
    QUICK_TRY: {"image_size": 64, "per_class": 200, "epochs": 3, "patience": 1, "batch_size": 20, "lr": 5e-4},
    PAPER_LEAKY: {"split": "paper-leaky"},
    PAPER_HONEST: {"split": "holdout"},
    UNSEEN_SPECIMENS_CPU: {
        "split": "kfold",
        "folds": 5,
        "grouped": True,
        "hed_jitter": 0.05,
        "image_size": 64,
        "per_class": 120,
        "epochs": 8,
        "batch_size": 20,
        "lr": 5e-4,
        "weights": "none",
    },
}
# What each preset is for, with the figures it was measured with: the buttons' tooltips.
TRAINING_PRESET_HELP: dict[str, str] = {
    QUICK_TRY: "A first run that finishes in minutes on a CPU: 64 px images, 200 augmented images per class, at "
    "most 3 epochs (it stops early once the validation loss stops improving), one honest holdout split, "
    "the site's backbone weights. Its accuracy says little about the model at the paper's settings; "
    "it shows the whole way from training to results and predictions.",
    PAPER_LEAKY: "The paper's settings and its own (leaky) protocol: augment all images, then split 80/20.",
    PAPER_HONEST: "The paper's settings, evaluated on untouched test images.",
    UNSEEN_SPECIMENS_CPU: "Five runs, one per fold of a split that keeps each specimen on one side: H&E stain "
    "jitter 0.05, 64 px, 120 augmented images per class, 8 epochs, no ImageNet weights. "
    "The best configuration compared so far on specimens left out of training: on the "
    "development images (IICBU-2008, 256 images, 2026-11-26, 2 CPU cores) it scored "
    "62.9% ± 9.3% over the five folds (docs/generalisation.md). A figure for that data "
    "and these settings only.",
}


def training_presets(gpu: bool) -> list[str]:
    """The training presets in the order to offer them: without a GPU the quick one comes first."""
    names = list(TRAINING_PRESETS)
    return names if not gpu else [*names[1:], names[0]]


def matching_preset(values: dict[str, Any], default_weights: str) -> str | None:
    """The training preset whose settings `values` (a RunConfig's) are, or None once any setting
    differs from each. A preset that names no weights stands for the site's (`default_weights`);
    one that leaves the grouping to the dataset matches either."""
    for name, changes in TRAINING_PRESETS.items():
        preset = {**training_preset(name), **({} if "weights" in changes else {"weights": default_weights})}
        free = {"dataset", "dataset_version", "fold", *(() if "grouped" in changes else ("grouped",))}
        if all(values.get(k) == v for k, v in preset.items() if k not in free):
            return name
    return None


@dataclass(frozen=True)
class WeightsChoice:
    """The backbone weights a preset proposes on this server, and why, in the page's words."""

    weights: str
    reason: str  # "" when the site's DEFAULT_WEIGHTS load


@functools.cache
def usable_weights(default_weights: str) -> WeightsChoice:
    """The site's DEFAULT_WEIGHTS when they load here, else random initialisation, said so: a
    preset that proposed ImageNet weights on an offline server would be refused at every first
    launch. Loading is tried once per process (a second or two, and torch), then remembered."""
    from core.training.model import check_weights  # torch: only when a preset is first drawn

    if default_weights == "none":
        return WeightsChoice("none", "")
    try:
        check_weights(default_weights)
    except UserError as exc:
        why = exc.for_page().split(". ")[0].rstrip(".")
        return WeightsChoice(
            "none",
            f"The presets train from random initialisation here, because the site's "
            f"backbone weights ({default_weights}) cannot be loaded on this server: {why}. "
            "Expect lower accuracy than with ImageNet weights; to use them, place their "
            "file on the server and choose 'A weights file on the server'.",
        )
    return WeightsChoice(default_weights, "")


def preset_config(name: str, default_weights: str) -> tuple[RunConfig, WeightsChoice | None]:
    """Training preset `name` as a RunConfig (dataset "-"), with the weights choice when the preset
    leaves the weights to the site (None when it names its own). The paper used ImageNet weights; a
    site that set DEFAULT_WEIGHTS (say, a local file, because it is offline) keeps its choice."""
    values = training_preset(name)
    choice = None
    if "weights" not in TRAINING_PRESETS[name]:
        choice = usable_weights(default_weights)
        values["weights"] = choice.weights
    return RunConfig(dataset="-", **values), choice


def training_preset(name: str) -> dict[str, Any]:
    """The full RunConfig values (less the dataset) of a training preset."""
    if name not in TRAINING_PRESETS:
        raise UserError(f"Unknown training preset '{name}'; choose one of {', '.join(TRAINING_PRESETS)}.")
    values = RunConfig(dataset="-").to_dict()
    del values["dataset"]
    values.update(TRAINING_PRESETS[name])
    return values
