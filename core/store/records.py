"""A run's JSON columns, typed: its summary (results) and its progress, and the records nested in the
summary: its calibration (also in the model file), its split's leak audit and its colour-only yardstick.

Each has one reader, `from_dict`, and one writer, `to_dict`; the rest of the code reads and writes
these columns through them, never by key. A row written before a key existed lacks it, and reads
as its default there (None for most); keys a reader does not know are left out. `to_dict` writes
only the values that are set, so a run's row holds what is known about it so far, and a row read
and written again keeps its shape. The modules that compute the nested records say them in words:
core/evaluation/calibration_words.py `calibration_words`, core/data/audit.py `record_verdict`,
core/evaluation/yardstick.py `describe`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.progress import Progress


def _known(cls: type, data: Mapping[str, Any] | None) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in (data or {}).items() if k in names}


def _set(record: Any, always: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `record` that are set (and those in `always`, set or not), nested records by
    their own `to_dict`, tuples as lists."""
    out = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if value is None and f.name not in always:
            continue
        out[f.name] = value.to_dict() if hasattr(value, "to_dict") else _plain(value)
    return out


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class CalibrationRecord:
    """RunSummary.calibration and the model file's "calibration": a run's temperature scaling and
    refer band, fitted on its validation part (core/evaluation/calibration.py `run_calibration`
    writes it; calibration_words.py says it). Rows written before a figure was kept lack it (None)."""

    temperature: float | None = None  # None: not calibrated (no validation part); `note` says why
    note: str | None = None
    n_val: int | None = None  # validation images it was fitted on
    val_ece_before: float | None = None  # expected calibration error on them, as trained -> scaled
    val_ece_after: float | None = None
    val_nll_before: float | None = None  # their log-loss, which the temperature was fitted to lower
    val_nll_after: float | None = None
    refer_target: float | None = None  # the accuracy the refer band promises
    refer_threshold: float | None = None  # calibrated: None refers every prediction
    refer_confidence: float | None = None  # how sure the band's claim is (None: recorded before the claim)
    refer_bound: float | None = None  # the lower confidence bound on the accepted images' accuracy
    refer_accepted: int | None = None  # validation images at or above the threshold
    val_probs: tuple[tuple[float, ...], ...] = ()  # calibrated validation probabilities, to choose other targets
    val_labels: tuple[int, ...] = ()
    test_ece_before: float | None = None  # on the test part (None: no test part)
    test_ece_after: float | None = None
    test_coverage: float | None = None  # share of test images at or above the threshold
    test_accepted_accuracy: float | None = None  # their accuracy (None: none accepted)

    @property
    def calibrated(self) -> bool:
        return self.temperature is not None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CalibrationRecord:
        known = _known(cls, data)
        known["val_probs"] = tuple(tuple(row) for row in known.get("val_probs") or ())
        known["val_labels"] = tuple(int(v) for v in known.get("val_labels") or ())
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        # None means something in a few fields (no temperature, refer everything, no bound, none accepted),
        # written wherever the record holds what they depend on, as run_calibration writes them.
        always = (
            ("temperature",)
            + (("refer_threshold",) if self.refer_target is not None else ())
            + (("refer_bound",) if self.refer_confidence is not None else ())
            + (("test_accepted_accuracy",) if self.test_coverage is not None else ())
        )
        out = _set(self, always)
        for empty in ("val_probs", "val_labels"):
            if not out[empty]:
                del out[empty]
        return out


@dataclass(frozen=True)
class LeakAudit:
    """RunSummary.leak_audit: what a run keeps of its split's leak audit (core/data/audit.py
    `AuditReport.as_record` writes it; `record_verdict` says it). Counts are of test images."""

    n_test: int = 0
    exact: int = 0  # the same pixels as a training image
    near: int = 0  # near-identical (perceptual hash)
    close: int = 0  # unusually close in colour and texture
    expected_close: float | None = None  # how many are close by chance (None: recorded before it was kept)
    nn_ratio: float | None = None  # median nearest-neighbour distance, test->train over train->train
    warning: str | None = None  # set when the audit found something to warn of
    verdict: str | None = None  # in one plain sentence (None: recorded before verdicts were kept)
    summary: str | None = None  # in the technical terms

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> LeakAudit:
        return cls(**_known(cls, data))

    def to_dict(self) -> dict[str, Any]:
        return _set(self, always=("warning", "nn_ratio"))


@dataclass(frozen=True)
class Yardstick:
    """RunSummary.colour_yardstick: how far stain colour alone gets on the run's test part
    (core/evaluation/yardstick.py `parts_yardstick` writes it; `describe` says it)."""

    accuracy: float | None = None
    n_train: int = 0  # images it was fitted on (training and validation)
    n_test: int = 0
    # (image id, right) of each test image, to compare the network with colour alone on the same
    # images; None: recorded before it was kept.
    correct: tuple[tuple[int, bool], ...] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Yardstick:
        known = _known(cls, data)
        if known.get("correct") is not None:
            known["correct"] = tuple((int(k), bool(v)) for k, v in known["correct"].items())
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        out = _set(self)
        if self.correct is not None:  # stored as an object: image id (as text) -> right
            out["correct"] = {str(image): right for image, right in self.correct}
        return out


# RunSummary's fields that hold a nested record, and its type.
_NESTED = {"calibration": CalibrationRecord, "leak_audit": LeakAudit, "colour_yardstick": Yardstick}


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
    calibration: CalibrationRecord | None = None
    leak_audit: LeakAudit | None = None
    colour_yardstick: Yardstick | None = None  # None also for the paper's protocol and without test images
    # A failed run's error (Run.error, in the command line's words) as the pages say it, where the
    # two differ (core.errors.UserError.page); cleared when the run starts again.
    error_page: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunSummary:
        known = _known(cls, data)
        for name, record in _NESTED.items():
            known[name] = record.from_dict(known[name]) if known.get(name) else None
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return _set(self)

    def replace(self, **changes: Any) -> RunSummary:
        return dataclasses.replace(self, **changes)

    @property
    def temperature(self) -> float | None:
        """The temperature fitted on the validation part; None without one."""
        return None if self.calibration is None else self.calibration.temperature


@dataclass(frozen=True)
class RunProgress:
    """Run.progress: where a running run is. While preparing data, a stage ("decode", "augment",
    ...) with `done` of `total` items; while training, stage "train" with the epoch and step.

    The JSON a run's row holds, as the running run writes it (old rows must keep reading): more
    than core/progress.py's `Progress` holds (epochs, steps, the speeds that the time left comes
    from), so it is its own record, and says itself as a `Progress` for the bars (`progress`)."""

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

    def progress(self, epochs: int) -> Progress:
        """Where the run is as the shared record: training steps done of all its steps (`epochs`: the
        run's), or, while it prepares its data, nothing done yet and the stage in words."""
        if self.stopped_early and self.epoch is not None:
            return Progress(
                1,
                1,
                f"Stopped early after epoch {self.epoch} of {epochs}: the validation loss stopped improving. "
                "Testing the best epoch",
            )
        if self.epoch is not None and self.steps:
            step = self.step or 0
            done = min(max(0, (self.epoch - 1) * self.steps + step), max(epochs, 1) * self.steps)
            return Progress(
                done, max(epochs, 1) * self.steps, f"Epoch {self.epoch} of {epochs}, step {step} of {self.steps}"
            )
        if self.stage:
            if self.total:
                return Progress(0, None, f"Preparing data: {self.stage} {self.done or 0} of {self.total}")
            return Progress(0, None, f"Preparing data: {self.stage}")
        return Progress(0, None, "Preparing data (decode, split, augment)")

    def bar(self, epochs: int) -> tuple[float, str]:
        """A fraction of the whole run and a sentence, for a progress bar (`epochs`: the run's)."""
        shared = self.progress(epochs)
        return shared.fraction, shared.words
