"""The paper's settings (Hasan et al., DESIGN.md section 2), written down once.

RunConfig's defaults (core/training/run_config.py), the augmentation's (AugmentParams,
core/transforms/augment.py), the network's head (core/training/model.py), the paper presets (which
are RunConfig's defaults, core/training/presets.py), the time estimate of the paper's settings
(core/jobs/estimate.py) and the reproduction report's comparison table (core/jobs/reproduce_report.py)
all read `PAPER`; none writes the paper's figures again. Imports nothing of the project, so that every
layer can read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class PaperAugmentation:
    """Augmentor's rotate, random distortion and zoom, with the paper's probabilities and sizes."""

    rotate_probability: float = 0.4
    rotate_max_left: int = 3
    rotate_max_right: int = 3
    distortion_probability: float = 0.4
    distortion_grid_width: int = 4
    distortion_grid_height: int = 4
    distortion_magnitude: int = 4
    zoom_probability: float = 0.2
    zoom_percentage_area: float = 0.9

    def words(self) -> str:
        """As the report's table says it: 'rotate 0.4/3/3, distortion 0.4/4/4/4, zoom 0.2/0.9'."""
        return (
            f"rotate {self.rotate_probability:g}/{self.rotate_max_left}/{self.rotate_max_right}, "
            f"distortion {self.distortion_probability:g}/{self.distortion_grid_width}/{self.distortion_grid_height}/"
            f"{self.distortion_magnitude}, zoom {self.zoom_probability:g}/{self.zoom_percentage_area:g}"
        )


@dataclass(frozen=True)
class Paper:
    """The paper's model, data and training settings."""

    backbone: str = "DenseNet-201"
    hidden: int = 512  # the head: FC 512, ReLU, dropout, FC classes
    dropout: float = 0.5
    classes: tuple[str, ...] = ("CLL", "FL", "MCL")
    image_size: int = 224  # px, a square
    per_class: int = 1200  # augmented images per class (3600 in all)
    augmentation: PaperAugmentation = field(default_factory=PaperAugmentation)
    weights: str = "imagenet"
    optimiser: str = "Adam"
    lr: float = 1e-4
    batch_size: int = 24
    epochs: int = 25
    test_fraction: float = 0.2  # an 80/20 split, and no validation part

    # The RunConfig fields the paper sets; a run with other values says so (the reproduction report).
    RUN_FIELDS: ClassVar[tuple[str, ...]] = (
        "image_size",
        "per_class",
        "epochs",
        "batch_size",
        "lr",
        "weights",
        "test_fraction",
    )

    def differences(self, values: object) -> dict[str, tuple[object, object]]:
        """Of RUN_FIELDS, those where `values` (a RunConfig) differs: name -> (its value, the paper's)."""
        mine = {name: (getattr(values, name), getattr(self, name)) for name in self.RUN_FIELDS}
        return {name: pair for name, pair in mine.items() if pair[0] != pair[1]}


PAPER = Paper()
