"""A run's full configuration: one frozen dataclass, stored as JSON on the run and in checkpoints.

Defaults are the paper's (Hasan et al.: optimiser, batch size, epochs, image size, augmented images
per class, Augmentor rotate/distort/zoom), read from core/paper.py's PAPER. The split default is the
honest one (split first, augment only the training part); the paper's own protocol is
`split="paper-leaky"`.

Each field's metadata (SETTING_KEYS) gives its help, label, bounds and choices: the CLI's flags
(`add_flags`, `from_flags`) and the Train page's form are both made from it, so a new setting is
added here once.

`validate()` holds a new run's settings to that same metadata (type, bounds, choices, pattern, finite
numbers, no NUL character), with a message naming the setting as the API and the flags name it; the
command line, the Train form and the API call it before queueing. Constructing a RunConfig checks
only what any run needs to make sense, so a run recorded before a bound existed still loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from core.data.splits import PROTOCOLS
from core.errors import UserError
from core.paper import PAPER
from core.transforms.augment import AugmentParams
from core.transforms.stain import METHODS as STAIN_METHODS

STAIN_NORMALISATIONS = ("none", *STAIN_METHODS)


def _setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A RunConfig field and what the CLI and the Train form need to offer it (see SETTING_KEYS)."""
    unknown = set(meta) - set(SETTING_KEYS)
    assert not unknown, f"unknown setting metadata {sorted(unknown)}"
    return field(default=default, default_factory=factory, metadata=meta)


# What a field's metadata may say. The CLI's flags (add_flags) and the Train page's form are both
# made from it, so a setting, its help and its default are written down once, here.
SETTING_KEYS = {
    "help": "what it does: the flag's help in `python -m core train --help` and the form's tooltip",
    "label": "the Train form's label",
    "section": "the Train form's box: data, augmentation, weights, training or generalisation",
    "key": "the Train page's widget key is tr_KEY (default: the field's name)",
    "choices": "the only values allowed: the flag's choices and the form's options",
    "option_labels": "a sentence per choice; the form then shows them as radio buttons",
    "options": "values the form offers; the flag takes any text",
    "bounds": "(lowest, highest) of the form's number input, and of any new run's value (validate)",
    "pattern": "(a regular expression the whole value must match, it in words): validate, the API's schema",
    "step": "the form's number input step",
    "format": "the form's number format, e.g. %.2f",
    "splits": "the split protocols it applies to; the form disables it under the others",
    "flag": "the flag, when it is not --NAME",
    "metavar": "the flag's placeholder in --help",
    "cli_default": "the flag's default when it is not the field's (a site setting applies instead)",
    "drawn_by_page": "the Train page draws this input itself (it shows records: datasets, groups, presets)",
    "internal": "why neither the CLI nor the form sets it",
}


@dataclass(frozen=True)
class RunConfig:
    dataset: str = _setting(help="name of an ingested dataset", label="Dataset", section="data", drawn_by_page=True)
    # None: the latest when the run is launched; create_runs records the number (core/data/versions.py).
    dataset_version: int | None = _setting(
        None,
        section="data",
        label="Dataset version",
        drawn_by_page=True,
        metavar="N",
        help="the dataset's version to train on: its images with their classes and groups as they were then "
        "(also --dataset NAME@N); default: the latest",
    )
    # split, made before augmentation (see core/data/splits.py)
    split: str = _setting(
        "holdout",
        section="data",
        label="Split protocol",
        choices=PROTOCOLS,
        help="holdout: one stratified test part; kfold: one run per fold; paper-leaky: the paper's "
        "augment-then-split (inflated)",
        option_labels={
            "holdout": "Holdout: split first, augment only the training part (honest)",
            "kfold": "k-fold cross-validation: one run per fold (honest)",
            "paper-leaky": "The paper's protocol: augment everything, then split (LEAKY)",
        },
    )
    grouped: bool | None = _setting(  # None: grouped when the dataset has groups
        None,
        section="data",
        label="Keep each specimen on one side",
        splits=("holdout", "kfold"),
        drawn_by_page=True,
        help="keep each group (specimen) on one side; default: when the dataset has groups",
    )
    test_fraction: float = _setting(
        PAPER.test_fraction,
        section="data",
        label="Test fraction",
        bounds=(0.05, 0.9),
        step=0.05,
        format="%.2f",
        splits=("holdout", "paper-leaky"),
        help=f"share of the images kept for testing (paper: {PAPER.test_fraction:g})",
    )
    val_fraction: float = _setting(
        0.1,
        section="data",
        label="Validation fraction",
        bounds=(0.0, 0.9),
        step=0.05,
        format="%.2f",
        help="of the non-test part; picks the best epoch, which is the one evaluated; 0 = none",
    )
    folds: int = _setting(
        5,
        section="data",
        label="Folds",
        bounds=(2, 20),
        step=1,
        splits=("kfold",),
        help="the number of folds of the kfold split, one run each",
    )
    fold: int = _setting(0, internal="each run of a k-fold experiment gets its fold from create_runs")  # 0 for holdout
    # A run trained again on a newer version of its data keeps the old run's test images as its test
    # part, so that the two are compared on the same images (core/data/splits.py, core/review/retrain.py).
    frozen_test_of_run: int | None = _setting(
        None,
        internal="set by 'train again' on the Runs page: the run whose test images this holdout run's "
        "test part must be, exactly; the rest is split as usual, never into test",
    )
    # augmentation of the training part only
    per_class: int = _setting(
        PAPER.per_class,
        section="augmentation",
        label="Augmented images per class",
        bounds=(1, 100_000),
        step=100,
        help=f"augmented training images per class (paper: {PAPER.per_class})",
    )
    augmentation: dict[str, Any] = _setting(
        factory=lambda: AugmentParams().to_dict(),
        section="augmentation",
        label="Augmentation preset",
        key="aug_preset",
        drawn_by_page=True,
        flag="--augment",
        metavar="KEY=VALUE",
        help=f"override an augmentation setting (repeatable); keys: {', '.join(AugmentParams().to_dict())}",
    )
    # model and optimisation
    weights: str = _setting(
        PAPER.weights,
        section="weights",
        label="Weights",
        drawn_by_page=True,
        cli_default=None,
        help="imagenet | none | PATH to a weights file (default: DEFAULT_WEIGHTS, else imagenet)",
    )
    epochs: int = _setting(
        PAPER.epochs,
        section="training",
        label="Epochs",
        bounds=(1, 1000),
        step=1,
        help=f"passes over the augmented training images (paper: {PAPER.epochs})",
    )
    batch_size: int = _setting(
        PAPER.batch_size,
        section="training",
        label="Batch size",
        bounds=(1, 1024),
        step=1,
        help=f"images per optimiser step (paper: {PAPER.batch_size})",
    )
    lr: float = _setting(
        PAPER.lr,
        section="training",
        label="Learning rate (Adam)",
        bounds=(1e-7, 1.0),
        step=1e-5,
        format="%.1e",
        help=f"Adam learning rate (paper: {PAPER.lr:g})",
    )
    image_size: int = _setting(
        PAPER.image_size,
        section="training",
        label="Image size (px)",
        bounds=(32, 1024),
        step=32,
        help=f"images are resized to this square before augmentation (paper: {PAPER.image_size})",
    )
    seed: int = _setting(
        0,
        section="data",
        label="Seed",
        bounds=(0, 2**31 - 1),
        step=1,
        help="seeds the split, the augmentation and the training",
    )
    device: str = _setting(
        "auto",
        section="training",
        label="Device",
        options=("auto", "cpu", "cuda"),
        pattern=(r"auto|cpu|cuda(:[0-9]{1,2})?", "auto, cpu, cuda or cuda:N"),
        help="auto | cpu | cuda | cuda:N; auto: the GPU when there is one (bf16), else the CPU (slow at 224 px)",
    )
    patience: int = _setting(
        0,
        section="training",
        label="Stop early after epochs without improvement",
        bounds=(0, 1000),
        step=1,
        metavar="EPOCHS",
        help="early stopping: end training once the validation loss has not improved for this many epochs in a row "
        "(the best epoch is still the one tested); 0 = off, every epoch is trained (the paper's way); needs a "
        "validation part",
    )
    compile: bool = _setting(
        True,
        internal="an implementation switch: torch.compile with CUDA graphs on a GPU, "
        "no effect on the CPU; training falls back to the eager model by itself",
    )
    # generalisation switches (not in the paper; off by default). See core/transforms/stain.py.
    stain_normalisation: str = _setting(
        "none",
        section="generalisation",
        label="Stain normalisation",
        choices=STAIN_NORMALISATIONS,
        key="stain",
        help="map every image's H&E colours onto one training image (the one of median optical density), before "
        "augmentation, so that staining differences between specimens matter less; prediction applies the "
        "same mapping, and the run's summary names the image",
    )
    hed_jitter: float = _setting(
        0.0,
        section="generalisation",
        label="H&E stain jitter",
        bounds=(0.0, 1.0),
        step=0.01,
        format="%.2f",
        key="hed",
        metavar="FLOAT",
        help="random H&E stain variation of each augmented training image (sigma = bias = this value, e.g. "
        "0.05); 0 = off; never applied to validation or test images",
    )
    tta: bool = _setting(
        False,
        section="generalisation",
        label="Test-time augmentation",
        help="average each prediction's softmax over the image and its 3 flips",
    )
    tiles: int = _setting(
        0,
        section="generalisation",
        label="Tiles per image",
        bounds=(0, 256),
        step=1,
        metavar="N",
        help="train on up to this many tiles of the image size per image, cut at native resolution (no "
        "downscaling), and predict an image by the mean of its tiles' probabilities; 0 = whole images",
    )

    def __post_init__(self) -> None:
        if self.split not in PROTOCOLS:
            raise UserError(f"Unknown split {self.split!r}; choose one of {', '.join(PROTOCOLS)}.")
        for name in ("epochs", "batch_size", "per_class", "folds"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.image_size < 32:
            raise UserError(f"image_size must be at least 32 (DenseNet-201 downsamples by 32), got {self.image_size}.")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}.")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise UserError(f"patience must be a whole number of epochs, 0 (off) or more, got {self.patience!r}.")
        if self.patience and not self.val_fraction:
            raise UserError(
                "Early stopping watches the validation loss: give --val-fraction above 0, or --patience 0.",
                page="Early stopping watches the validation loss: give a validation fraction above 0, "
                "or set 'Stop early after epochs without improvement' to 0.",
            )
        if not 0 <= self.fold < (self.folds if self.split == "kfold" else 1):
            raise UserError(f"fold {self.fold} does not exist for split {self.split!r} with {self.folds} folds.")
        AugmentParams.from_dict(self.augmentation)  # validates
        if self.stain_normalisation not in STAIN_NORMALISATIONS:
            raise UserError(
                f"Unknown stain_normalisation {self.stain_normalisation!r}; "
                f"choose one of {', '.join(STAIN_NORMALISATIONS)}."
            )
        jitter = self.hed_jitter
        if (
            isinstance(jitter, bool)
            or not isinstance(jitter, (int, float))
            or not (math.isfinite(jitter) and 0 <= jitter <= 1)
        ):
            raise UserError(f"hed_jitter must be a number from 0 (off) to 1, e.g. 0.05; got {jitter!r}.")
        if not isinstance(self.tta, bool):
            raise UserError(f"tta must be true or false, got {self.tta!r}.")
        if isinstance(self.tiles, bool) or not isinstance(self.tiles, int) or not 0 <= self.tiles <= 256:
            raise UserError(f"tiles must be a whole number from 0 (whole images) to 256, got {self.tiles!r}.")
        if self.tiles and self.split == "paper-leaky":
            raise UserError(
                "The paper's protocol trains on whole images; tiles work with the holdout and kfold splits."
            )

    def validate(self) -> RunConfig:
        """This config, if a new run may have it: every field of its own type, within its `bounds`,
        among its `choices`, matching its `pattern`, finite, and no text with a NUL character (which
        PostgreSQL cannot store); UserError naming the first field that is not."""
        for f in dataclasses.fields(self):
            _check_setting(f, getattr(self, f.name))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"Unknown run setting(s) {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def augment_params(self) -> AugmentParams:
        return AugmentParams.from_dict(self.augmentation)


_KIND_WORDS = {
    bool: "true or false",
    int: "a whole number",
    float: "a finite number",
    str: "text without a NUL character",
    dict: "an object",
}


def _check_setting(f: dataclasses.Field, value: Any) -> None:
    """UserError unless `value` is one that field `f`'s metadata allows (RunConfig.validate)."""
    meta, kind = f.metadata, setting_type(f)
    if value is None and f.default is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    fits = (
        number and math.isfinite(value)
        if kind is float
        else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    )
    if fits and kind is str:
        fits = "\x00" not in value
    if fits and kind is dict:
        fits = all(isinstance(k, str) and "\x00" not in k for k in value)
    if not fits:
        _refuse(f, f"must be {_KIND_WORDS[kind]}", value)
    if "bounds" in meta and not meta["bounds"][0] <= value <= meta["bounds"][1]:
        low, high = meta["bounds"]
        _refuse(f, f"must be from {low:g} to {high:g}" if kind is float else f"must be from {low} to {high}", value)
    if "choices" in meta and value not in meta["choices"]:
        _refuse(f, f"must be one of {', '.join(map(str, meta['choices']))}", value)
    if "pattern" in meta and not re.fullmatch(meta["pattern"][0], value):
        _refuse(f, f"must be {meta['pattern'][1]}", value)


def _refuse(f: dataclasses.Field, rule: str, value: Any) -> None:
    shown = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a number of over 30 digits"
    shown = shown[:80]
    raise UserError(
        f"Run setting '{f.name}' ({flag_of(f)}) {rule}; got {shown}.",
        page=f"{f.metadata.get('label', f.name)} {rule}; got {shown}.",
    )


# ---------------------------------------------------------------------------------------------
# The settings a person chooses, as command-line flags (the Train page builds its form from the same fields)


def settings_fields(names: Sequence[str] | None = None) -> list[dataclasses.Field]:
    """RunConfig's fields that a person sets (all but the internal ones), or those named, in that order."""
    if names is not None:
        by_name = {f.name: f for f in dataclasses.fields(RunConfig)}
        return [by_name[name] for name in names]
    return [f for f in dataclasses.fields(RunConfig) if "internal" not in f.metadata]


def setting_type(f: dataclasses.Field) -> type:
    """The field's value type: bool, int, float, str or dict (`bool | None` is bool)."""
    kind = get_type_hints(RunConfig)[f.name]
    if get_origin(kind) is dict:
        return dict
    return next((k for k in get_args(kind) if k is not type(None)), kind)  # X | None -> X


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """A flag for each setting (or those named): --NAME with the field's type, default, choices and help."""
    for f in settings_fields(names):
        meta, kind = f.metadata, setting_type(f)
        options: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if "metavar" in meta:
            options["metavar"] = meta["metavar"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            options.update(required=True, default=argparse.SUPPRESS)
        elif kind is not dict:
            options["default"] = meta.get("cli_default", f.default)
        if kind is bool:
            parser.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **options)
        elif kind is dict:  # KEY=VALUE items on top of the default's
            parser.add_argument(flag_of(f), action="append", **options)
        else:
            parser.add_argument(flag_of(f), type=kind, choices=meta.get("choices"), **options)


def from_flags(args: argparse.Namespace, names: Sequence[str] | None = None, **values: Any) -> RunConfig:
    """The RunConfig of the flags add_flags made (for `names`), with `values` on top; the rest default."""
    chosen = {f.name: getattr(args, f.name) for f in settings_fields(names)}
    for f in settings_fields(names):
        if setting_type(f) is dict:
            chosen[f.name] = _key_values(flag_of(f), f.default_factory(), chosen[f.name] or [])
    return RunConfig(**{**chosen, **values}).validate()


def _key_values(flag: str, base: dict[str, Any], items: Sequence[str]) -> dict[str, Any]:
    out = dict(base)
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value) if "." in value else int(value)
        except ValueError:
            raise UserError(f"{flag} expects KEY=NUMBER, got {item!r}.") from None
    return out
