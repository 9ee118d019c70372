"""A run's full configuration: one frozen dataclass, stored as JSON on the run and in checkpoints.

Defaults are the paper's (Hasan et al.): Adam 1e-4, batch 24, 25 epochs, 224x224, 1200 augmented
images per class, Augmentor rotate/distort/zoom. The split default is the honest one (split first,
augment only the training part); the paper's own protocol is `split="paper-leaky"`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from core.transforms.augment import AugmentParams
from core.errors import UserError
from core.data.splits import PROTOCOLS
from core.transforms.stain import METHODS as STAIN_METHODS

STAIN_NORMALISATIONS = ("none", *STAIN_METHODS)


@dataclass(frozen=True)
class RunConfig:
    dataset: str
    # split, made before augmentation (see core/data/splits.py)
    split: str = "holdout"  # holdout | kfold | paper-leaky
    grouped: bool | None = None  # None: grouped when the dataset has groups
    test_fraction: float = 0.2  # paper: 80/20
    val_fraction: float = 0.1  # of the non-test part; picks the best epoch; 0 = none
    folds: int = 5
    fold: int = 0  # which k-fold fold this run trains (0 for holdout)
    # augmentation of the training part only
    per_class: int = 1200  # paper: 1200 images per class after augmentation
    augmentation: dict[str, Any] = field(default_factory=lambda: AugmentParams().to_dict())
    # model and optimisation
    weights: str = "imagenet"  # imagenet | none | path to a weights file
    epochs: int = 25
    batch_size: int = 24
    lr: float = 1e-4
    image_size: int = 224
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = True  # torch.compile with CUDA graphs on a GPU; no effect on the CPU
    # generalisation switches (not in the paper; off by default). See core/transforms/stain.py.
    stain_normalisation: str = "none"  # none | macenko | reinhard: map every image onto a training reference
    hed_jitter: float = 0.0  # sigma = bias of the H&E stain jitter on augmented training images; 0 = off
    tta: bool = False  # test-time augmentation: mean softmax over identity + 3 flips
    tiles: int = 0  # >0: train on up to this many image_size tiles per image at native resolution, vote (core/transforms/tiles.py)

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
        if not 0 <= self.fold < (self.folds if self.split == "kfold" else 1):
            raise UserError(f"fold {self.fold} does not exist for split {self.split!r} with {self.folds} folds.")
        AugmentParams.from_dict(self.augmentation)  # validates
        if self.stain_normalisation not in STAIN_NORMALISATIONS:
            raise UserError(f"Unknown stain_normalisation {self.stain_normalisation!r}; "
                            f"choose one of {', '.join(STAIN_NORMALISATIONS)}.")
        jitter = self.hed_jitter
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not (math.isfinite(jitter) and 0 <= jitter <= 1):
            raise UserError(f"hed_jitter must be a number from 0 (off) to 1, e.g. 0.05; got {jitter!r}.")
        if not isinstance(self.tta, bool):
            raise UserError(f"tta must be true or false, got {self.tta!r}.")
        if isinstance(self.tiles, bool) or not isinstance(self.tiles, int) or not 0 <= self.tiles <= 256:
            raise UserError(f"tiles must be a whole number from 0 (whole images) to 256, got {self.tiles!r}.")
        if self.tiles and self.split == "paper-leaky":
            raise UserError("The paper's protocol trains on whole images; tiles work with the holdout and kfold splits.")

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
