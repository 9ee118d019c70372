"""A run's calibration record (core/store/records.py CalibrationRecord) in words: the one wording of
the command line (`evaluate`), the Runs page and the Predict page, with one rounding.

The plain sentences say "confidence" and "calibration error"; the technical terms (temperature,
ECE, T) go in `CalibrationWords.technical`, which the pages show in tooltips.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.evaluation.calibration import N_BINS, ReferBand, recorded_band
from core.store.records import CalibrationRecord


def band_sentence(band: ReferBand) -> str:
    """The refer band in a reader's words, with what it rests on."""
    if band.threshold is None:
        return (
            f"No confidence threshold can promise {band.target:.0%} accuracy from the {band.n_val} validation "
            f"images (at {band.confidence:.0%} confidence), so every prediction of this model is marked "
            '"uncertain, refer".'
        )
    shown = (
        "every prediction is shown"
        if band.threshold == 0
        else (f'predictions less confident than {band.threshold:.1%} are marked "uncertain, refer"')
    )
    return (
        f"{shown[0].upper()}{shown[1:]}: the others are right at least {band.target:.0%} of the time, with "
        f"{band.confidence:.0%} confidence, judged on {band.accepted} of the {band.n_val} validation images "
        f"(a lower bound of {band.bound:.1%}, not the raw rate)."
    )


def scaling_words(temperature: float) -> str:
    """What a fitted temperature did, in words: 'softened (scores divided by 8.1): the model was ...'."""
    if temperature > 1.05:
        return (
            f"softened (scores divided by {temperature:.3g}): the model was over-confident, so its confidences "
            "are pulled toward an even split"
        )
    if temperature < 0.95:
        return (
            f"sharpened (scores divided by {temperature:.3g}): the model was under-confident, so its confidences "
            "are pushed toward its answer"
        )
    return f"left nearly as they were (scores divided by {temperature:.3g}): the model's confidences already matched"


def change_text(pair: tuple[float, float] | None) -> str:
    """A figure before -> after scaling, e.g. '0.310 → 0.120' ('–' without one)."""

    def figure(value: float) -> str:  # both are at least 0: a rounding error below it reads 0.000, not -0.000
        return f"{max(0.0, value):.3f}"

    return "–" if pair is None else f"{figure(pair[0])} → {figure(pair[1])}"


@dataclass(frozen=True)
class CalibrationWords:
    """A run's calibration record in words, said once for the command line, the Runs page and the
    Predict page, with one rounding: the temperature to 3 significant figures, the calibration
    errors and log-losses to 3 decimals. The plain sentences say 'confidence' and 'calibration
    error'; the technical terms (temperature, ECE) are in `technical`, for tooltips."""

    calibrated: bool
    note: str = ""  # why not, when not calibrated
    scaling: str = ""  # the temperature, e.g. "1.52"
    val_error: str = "–"  # the calibration error on the validation images, as trained → after scaling
    test_error: str = "–"
    scaling_sentence: str = ""  # what the scaling did, what it was fitted on and to
    refer_sentence: str = ""  # the refer band, with what it rests on
    technical: str = ""

    ERROR_HELP = (
        "Expected calibration error (ECE): the average gap between the confidence of a prediction and how "
        "often such predictions are right, over confidence bins; 0 is perfect. As trained → after "
        "confidence scaling."
    )

    def text(self) -> str:
        """The whole record in a few lines, for the command line and reports."""
        if not self.calibrated:
            return f"Calibration: none ({self.note})."
        return f"Calibration: {self.scaling_sentence} {self.technical}\nRefer band: {self.refer_sentence}"


def calibration_words(record: CalibrationRecord | None, band: ReferBand | None = None) -> CalibrationWords:
    """`record` (run_calibration's) in words; `band`: a refer band chosen on its validation images for
    another target (ReferBand), else the run's own. The test figures of the band are said only of the
    run's own band, the one they were measured with."""
    if record is None or not record.calibrated:
        note = "the run was recorded before calibration was added" if record is None or not record.note else record.note
        return CalibrationWords(False, note)
    n_val = len(record.val_labels) if record.n_val is None else record.n_val
    scaling = f"{record.temperature:.3g}"
    val_error = None if record.val_ece_before is None else (record.val_ece_before, record.val_ece_after)
    test_error = None if record.test_ece_before is None else (record.test_ece_before, record.test_ece_after)
    sentence = (
        f"Confidence adjusted on the run's {n_val} validation images to lower their log-loss (how surprised "
        "the model is by the right answers)"
    )
    if record.val_nll_before is not None:
        sentence += f": {change_text((record.val_nll_before, record.val_nll_after))}"
    sentence += f". Its confidences are {scaling_words(record.temperature)}."
    if val_error is not None and val_error[1] > val_error[0]:
        sentence += (
            " The calibration error on the same images rose a little: it is another yardstick (confidence "
            f"against accuracy in {N_BINS} bins), coarse with {n_val} images, and the scaling did not aim "
            "at it."
        )
    own = band is None
    band = recorded_band(record) if own else band
    refer = band_sentence(band)
    if (
        own and band.threshold is not None and record.refer_confidence is not None and record.test_coverage is not None
    ):  # measured with this very band
        accepted = record.test_accepted_accuracy
        refer += (
            f" On the test part it keeps {record.test_coverage:.0%} of the images as confident"
            + ("" if accepted is None else f", {accepted:.1%} of them right")
            + "."
        )
    technical = (
        f"Temperature scaling: the model's scores (logits) are divided by T = {scaling}, fitted on the "
        f"{n_val} validation images so that a confidence of 80% is right about 80% of the time; above 1 the model was "
        "over-confident and its confidences are toned down, below 1 they are raised. Expected calibration "
        f"error (ECE) on validation {change_text(val_error)}"
        + ("" if test_error is None else f", on test {change_text(test_error)}")
        + "."
    )
    return CalibrationWords(
        True, "", scaling, change_text(val_error), change_text(test_error), sentence, refer, technical
    )
