"""Class probabilities as they are shown, and what they are.

A run with a validation part has a temperature fitted on it (core/evaluation/calibration.py); its
calibrated probabilities are what every display shows by default: the Runs page's gallery, the
Predict page and `python -m core predict`. A run without one shows the model's raw softmax. Either
way the display says which (`label`), so that one image never gets two unexplained numbers.
No torch here: the pages import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.evaluation.calibration import calibrate
from core.store.records import CalibrationRecord

CALIBRATED = "calibrated probability"
RAW = "raw model probability"


@dataclass(frozen=True)
class Probabilities:
    """(N, C) probabilities of N images: the model's own (`raw`) and, where the run has a temperature,
    calibrated; `shown` is the one to display, `label` says which it is."""

    raw: np.ndarray
    temperature: float | None = None

    @classmethod
    def of_run(cls, raw, calibration: CalibrationRecord | None, *, calibrated: bool = True) -> Probabilities:
        """`raw` with the temperature of a run's calibration record (none when `calibrated` is False)."""
        temperature = calibration.temperature if calibrated and calibration is not None else None
        return cls(np.asarray(raw, dtype=np.float64), temperature)

    @property
    def is_calibrated(self) -> bool:
        return self.temperature is not None

    @property
    def shown(self) -> np.ndarray:
        if self.temperature is None or not len(self.raw):
            return self.raw
        return calibrate(self.raw, self.temperature)

    @property
    def label(self) -> str:
        return CALIBRATED if self.is_calibrated else RAW
