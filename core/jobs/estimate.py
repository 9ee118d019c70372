"""What this machine can train on and how long the runs of a RunConfig will take on it, said before
they are launched: the one probe of its GPUs (`machine_summary`), the reference speeds, and the one
estimate (`estimate`), which the Train page's figure for its settings and the Home page's for the
paper's (`paper_estimate`, `MachineSummary.sentence`) both come from.

From this machine's own measurements where it has some: the training speed (images per second,
RunSummary.images_per_second) of the latest succeeded runs on the same kind of device at the same
image size, times the images to train (augmented images per class x classes x epochs, per run),
plus the time those runs spent outside training (building the model, decoding, augmenting, the
audit, the test: the run's whole time less Run.timings' "train"). Before any run was measured
here, a rough figure from a stated assumption, labelled as such. No torch at import: the Train page
calls this as it draws, and only `machine_summary` loads torch, once, when first called.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.paper import PAPER
from core.store.db import Run, RunStatus
from core.store.records import RunSummary
from core.training.run_config import RunConfig
from core.words import duration_text

RECENT = 5  # measured runs whose median speed counts: the latest, so that a changed machine soon shows
LOOKED_AT = 100  # succeeded runs on the device searched for ones at the image size

# The assumption before any measurement. CPU: CPU_IMAGES_PER_SECOND_PER_CORE at the paper's 224 px
# (below) and CPU_64_PX_PER_CORE at 64 px, with the speed taken to fall as a power of
# the image side between (and beyond) the two. The 64 px figure is the development machine's, its 2
# cores idle (2026-12-02, the "Try it on this machine" settings at 120 images per class): 24.4
# images/s, and 45 s of the run outside training (model, data, audit, test). Where other work shares
# the cores it is several times slower (docs/generalisation.md: about 10 images/s). GPU: the 224 px
# figure at every size, since at these batch sizes a GPU's time goes to launching DenseNet's ~200
# layers rather than to pixels.
CPU_64_PX_PER_CORE = 12.0
ASSUMED_OTHER_SECONDS = 45.0  # per run, outside training


# Reference speeds for the paper's 224 px training (bench/RESULTS.md): one H100, eager fp32 at
# batch 24, about 180 images/s (design notes); 2 idle CPU cores, forward and backward, about 4.4
# images/s, i.e. 2.2 per core. Only the order of magnitude is meant.
GPU_IMAGES_PER_SECOND = 180.0
CPU_IMAGES_PER_SECOND_PER_CORE = 2.2


@dataclass(frozen=True)
class MachineSummary:
    """What this server has to train on."""

    gpus: tuple[str, ...]  # the CUDA devices torch sees, by name
    cpu_cores: int

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def sentence(self, paper: TimeEstimate | None = None) -> str:
        """What this server trains on, and about how long the paper's settings take on it: `paper`,
        the estimate of `paper_estimate` (this machine's own speed where it has measured one), else
        the same estimate from the reference speeds alone."""
        paper = paper or estimate(paper_config(), PAPER_CLASSES, self)
        settings = f"{paper.image_size} px, {paper.epochs} epochs"
        hours = duration_text(paper.minutes * 60, long=True)
        # Until a run at that size has finished here, the figures are reference speeds: say so.
        if paper.measured:
            took = f"about {hours} here, as runs here went"
        else:
            took = f"roughly {hours} here by reference speeds, not timed on this server yet"
        if self.has_gpu:
            names = ", ".join(sorted(set(self.gpus)))
            return (
                f"GPU on this server: {len(self.gpus)} × {names}. Training runs on it; the paper's settings "
                f"({settings}) take {took}."
            )
        slower = GPU_IMAGES_PER_SECOND / (CPU_IMAGES_PER_SECOND_PER_CORE * self.cpu_cores)
        slower = round(slower, -1) if slower >= 15 else round(slower)
        return (
            f"No GPU on this server: training runs on the CPU ({self.cpu_cores} cores), roughly {slower:.0f}× "
            "slower than on one GPU by reference speeds (an H100's, and 2 CPU cores' scaled to these). The "
            f"CPU training preset (64 px) takes minutes per fold; the paper's settings ({settings}) take {took}."
        )


@functools.cache
def machine_summary() -> MachineSummary:
    """This server's GPUs and CPU cores, once per process. Imports torch (only here, when called),
    so opening a page that shows it does not load torch as the page is imported."""
    import torch

    gpus = ()
    if torch.cuda.is_available():
        gpus = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return MachineSummary(gpus, cores)


@dataclass(frozen=True)
class TimeEstimate:
    """About how long the runs of one launch take here, and what the figure rests on."""

    minutes: float
    device: str  # "GPU" or "CPU"
    runs: int  # one, or one per fold
    images: int  # training images per run and epoch
    epochs: int
    images_per_second: float
    other_seconds: float  # per run, outside training
    measured_runs: int  # runs the speed comes from; 0: the assumption
    image_size: int
    stops_early: bool
    assumption: str = ""  # where the assumed speed comes from, when nothing was measured here

    @property
    def measured(self) -> bool:
        return self.measured_runs > 0

    def sentence(self) -> str:
        """E.g. 'About 4 minutes on this machine (CPU): 360 training images x 3 epoch(s) at 9.8
        images/s, plus ...', or, unmeasured, a rough figure that names its assumption."""
        runs = f" × {self.runs} runs" if self.runs > 1 else ""
        work = (
            f"{self.images:,} training images × {self.epochs} epoch(s){runs} at {self.images_per_second:.3g} "
            f"images/s, plus about {duration_text(self.other_seconds, long=True)} per run to prepare the data and test"
        )
        total = duration_text(self.minutes * 60, long=True) + (f" for the {self.runs} runs" if self.runs > 1 else "")
        sooner = " Early stopping may end it sooner." if self.stops_early else ""
        if self.measured:
            return (
                f"About {total} on this machine ({self.device}): {work}, as the last {self.measured_runs} "
                f"run(s) at {self.image_size} px on its {self.device} went.{sooner}"
            )
        return (
            f"No run at {self.image_size} px has been timed on this machine's {self.device} yet. A rough "
            f"figure from an assumption, not a measurement: about {total}, assuming {work} ({self.assumption}). "
            f"Once a run has finished here, the figure comes from this machine's own speed.{sooner}"
        )


def device_kind(config: RunConfig, machine: MachineSummary) -> str:
    """ "cuda" or "cpu": where the run will train ("auto" takes the GPU when there is one)."""
    if config.device == "auto":
        return "cuda" if machine.has_gpu else "cpu"
    return "cuda" if config.device.startswith("cuda") else "cpu"


def assumed_speed(kind: str, image_size: int, cpu_cores: int) -> float:
    """Training images per second before any measurement (see the assumption above)."""
    if kind == "cuda":
        return GPU_IMAGES_PER_SECOND
    exponent = math.log(CPU_64_PX_PER_CORE / CPU_IMAGES_PER_SECOND_PER_CORE) / math.log(224 / 64)
    return CPU_64_PX_PER_CORE * (64 / image_size) ** exponent * cpu_cores


PAPER_CLASSES = len(PAPER.classes)


def paper_config() -> RunConfig:
    """The paper's settings as a run (RunConfig's defaults are the paper's)."""
    return RunConfig(dataset="-")


def paper_estimate(session: Session, machine: MachineSummary) -> TimeEstimate:
    """About how long the paper's settings train on this machine (three classes): the Home page's figure,
    made as the Train page's is."""
    return time_estimate(session, paper_config(), PAPER_CLASSES, machine)


def time_estimate(session: Session, config: RunConfig, classes: int, machine: MachineSummary) -> TimeEstimate:
    """About how long `config`'s runs take on this machine (a dataset of `classes` classes), from the
    latest runs measured here at its image size on the same kind of device."""
    kind = device_kind(config, machine)
    speeds, others = [], []
    found = session.execute(
        select(Run.config, Run.summary, Run.timings, Run.started_at, Run.finished_at)
        .where(Run.status == RunStatus.succeeded, Run.device.like(f"{kind}%"))
        .order_by(Run.id.desc())
        .limit(LOOKED_AT)
    )
    for run_config, summary, timings, started, finished in found:
        speed = RunSummary.from_dict(summary).images_per_second
        if speed and RunConfig.from_dict(run_config).image_size == config.image_size:
            speeds.append(speed)
            if started and finished:  # the whole run less its training: model, data, audit, test
                others.append((finished - started).total_seconds() - (timings or {}).get("train", 0.0))
            if len(speeds) == RECENT:
                break
    return estimate(config, classes, machine, speeds, others)


def estimate(
    config: RunConfig,
    classes: int,
    machine: MachineSummary,
    speeds: Sequence[float] = (),
    others: Sequence[float] = (),
) -> TimeEstimate:
    """The one estimate: `config`'s runs on `machine`, at the median of the measured `speeds` (images
    per second) plus the median time outside training (`others`, seconds per run); without
    measurements, at the assumed speed."""
    kind = device_kind(config, machine)
    measured = bool(speeds)
    # The median: one run slowed by other work on the machine does not drag the figure down.
    speed = statistics.median(speeds) if measured else assumed_speed(kind, config.image_size, machine.cpu_cores)
    other = statistics.median(others) if others else ASSUMED_OTHER_SECONDS
    runs = config.folds if config.split == "kfold" else 1
    images = config.per_class * classes
    seconds = runs * (images * config.epochs / speed + other)
    return TimeEstimate(
        minutes=seconds / 60,
        device="GPU" if kind == "cuda" else "CPU",
        runs=runs,
        images=images,
        epochs=config.epochs,
        images_per_second=speed,
        other_seconds=other,
        measured_runs=len(speeds),
        image_size=config.image_size,
        stops_early=config.patience > 0,
        assumption="" if measured else _assumption(kind, config.image_size, machine.cpu_cores),
    )


def _assumption(kind: str, image_size: int, cpu_cores: int) -> str:
    if kind == "cuda":
        return "the speed of one H100 at the paper's 224 px in the design notes, for every image size"
    return f"the speed of the development machine's 2 idle CPU cores at 64 px, scaled to {cpu_cores} cores" + (
        "" if image_size == 64 else f" and to {image_size} px"
    )
