"""A run's JSON columns, typed: its summary (results) and its progress.

Each has one reader, `from_dict`, and one writer, `to_dict`; the rest of the code reads and writes
these columns through them, never by key. A row written before a key existed lacks it, and reads
as None there; keys a reader does not know are left out. `to_dict` writes only the values that are
set, so a run's row holds what is known about it so far.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _known(cls: type, data: Mapping[str, Any] | None) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in (data or {}).items() if k in names}


def _set(record: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}


@dataclass(frozen=True)
class RunSummary:
    """Run.summary: what a run found out, filled in as it goes (core/jobs/runs.py writes it)."""

    protocol: str | None = None  # the split's label, e.g. "holdout 80/20, grouped by specimen, seed 0"
    test_accuracy: float | None = None  # None: no test samples
    best_epoch: int | None = None  # by validation accuracy; its checkpoint is the one tested
    n_train: int | None = None  # samples: augmented training images, untouched validation and test images
    n_val: int | None = None
    n_test: int | None = None
    images_per_second: float | None = None  # training speed, mean over the epochs
    # Early stopping (RunConfig.patience): whether it ended training before the last epoch, and
    # the last epoch it trained then; None for runs recorded before it existed.
    stopped_early: bool | None = None
    stopped_at_epoch: int | None = None
    gpu_peak_memory_gib: float | None = None  # None on the CPU
    stain_reference_image_id: int | None = None  # with stain normalisation: the training image mapped onto
    calibration: dict[str, Any] | None = None  # core/evaluation/calibration.py run_calibration
    leak_audit: dict[str, Any] | None = None  # core/data/audit.py AuditReport.as_record
    colour_yardstick: dict[str, Any] | None = None  # core/evaluation/yardstick.py split_yardstick
    # A failed run's error (Run.error, in the command line's words) as the pages say it, where the
    # two differ (core.errors.UserError.page); cleared when the run starts again.
    error_page: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunSummary:
        return cls(**_known(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return _set(self)

    def replace(self, **changes: Any) -> RunSummary:
        return dataclasses.replace(self, **changes)

    @property
    def temperature(self) -> float | None:
        """The temperature fitted on the validation part; None without one."""
        return (self.calibration or {}).get("temperature")


@dataclass(frozen=True)
class RunProgress:
    """Run.progress: where a running run is. While preparing data, a stage ("decode", "augment",
    ...) with `done` of `total` items; while training, stage "train" with the epoch and step."""

    stage: str | None = None
    done: int | None = None
    total: int | None = None
    epoch: int | None = None  # 1-based, of `epochs`
    epochs: int | None = None
    step: int | None = None  # within the epoch, of `steps`
    steps: int | None = None
    stopped_early: bool | None = None  # early stopping ended training after `epoch`; the run is being tested
    step_seconds: float | None = None  # seconds per training step over the last few seconds (the speed now)
    epoch_step_seconds: float | None = None  # seconds per step over this epoch so far

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunProgress:
        return cls(**_known(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return _set(self)

    def bar(self, epochs: int) -> tuple[float, str]:
        """A fraction of the whole run and a sentence, for a progress bar (`epochs`: the run's)."""
        if self.stopped_early and self.epoch is not None:
            return 1.0, (f"Stopped early after epoch {self.epoch} of {epochs}: the validation loss stopped "
                         "improving. Testing the best epoch")
        if self.epoch is not None and self.steps:
            step = self.step or 0
            done = ((self.epoch - 1) + step / self.steps) / max(epochs, 1)
            return min(1.0, max(0.0, done)), f"Epoch {self.epoch} of {epochs}, step {step} of {self.steps}"
        if self.stage:
            if self.total:
                return 0.0, f"Preparing data: {self.stage} {self.done or 0} of {self.total}"
            return 0.0, f"Preparing data: {self.stage}"
        return 0.0, "Preparing data (decode, split, augment)"
