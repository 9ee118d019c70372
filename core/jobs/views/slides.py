"""What the pages and the API show of whole-slide jobs (core/jobs/slide_jobs.py runs them): each job
as a `SlideJobView` with its progress and, once done, its `SlideVerdict`; the heat map over the
slide's thumbnail; the models that can classify slides, with the scale each was trained at.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.config import Settings
from core.errors import UserError
from core.inference.model_meta import read_description
from core.progress import Progress, seconds_left
from core.slides.scale import model_scale
from core.store.db import ENDED, Run, RunStatus, SlideJob, utcnow
from core.store.runs import model_path


@dataclass(frozen=True)
class SlideVerdict:
    """A whole slide's verdict: the mean of its tissue tiles' probabilities, referred by the run's band
    (chosen on its validation images, not on slides). Read from a finished job's summary
    (core/slides/outputs.py); the API serves it as it is, with these notes as its field descriptions."""

    predicted: str
    probabilities: dict[str, float]
    """class -> probability, of probability_kind"""
    probability_kind: Literal["calibrated", "raw"]
    refer: bool | None
    """uncertain, refer; null: no calibration, so no band"""
    refer_threshold: float | None
    refer_target: float | None
    tissue_share: dict[str, float]
    """class -> share of the tissue tiles predicted as it"""
    tiles_kept: int
    tile_px: int
    tile_mpp: float
    seconds: float
    tiles_per_second: float
    slide_width: int
    slide_height: int
    slide_mpp: float

    @classmethod
    def from_summary(cls, d: dict[str, Any]) -> SlideVerdict:
        slide = d["slide"]
        return cls(
            d["predicted"],
            dict(d["probabilities"]),
            d["probability_kind"],
            d.get("refer"),
            d.get("refer_threshold"),
            d.get("refer_target"),
            dict(d["tissue_share"]),
            int(d["tiles"]["kept"]),
            int(d["scale"]["tile_px"]),
            float(d["scale"]["mpp"]),
            float(d["seconds"]),
            float(d["tiles_per_second"]),
            int(slide["width"]),
            int(slide["height"]),
            (float(slide["mpp_x"]) + float(slide["mpp_y"])) / 2,
        )


@dataclass(frozen=True)
class SlideJobView:
    id: int
    run_id: int
    slide_name: str
    user: str
    status: RunStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    done: int
    total: int | None
    error: str | None
    verdict: SlideVerdict | None
    folder: Path

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def failed(self) -> bool:
        return self.status == RunStatus.failed

    @property
    def cancelled(self) -> bool:
        return self.status == RunStatus.cancelled

    @property
    def queued(self) -> bool:
        return self.status == RunStatus.queued

    def progress(self, now: datetime | None = None) -> Progress:
        """The tiles classified so far as the shared record, with the time left at the rate of the
        tiles so far (tiling included, so a little high early on; None until some tiles are done)."""
        left = None
        if self.status == RunStatus.running and self.started_at is not None:
            left = seconds_left(((now or utcnow()) - self.started_at).total_seconds(), self.done, self.total)
        return Progress(self.done, self.total, f"{self.done:,} of {self.total or 0:,} tiles classified", left)

    @property
    def fraction(self) -> float:
        return self.progress().fraction

    def seconds_left(self, now: datetime | None = None) -> float | None:
        return self.progress(now).seconds_left

    def file(self, name: str) -> Path | None:
        """One of the job's files (see the module docstring), when it exists."""
        path = self.folder / name
        return path if self.status == RunStatus.succeeded and path.is_file() else None


def slide_job(session: Session, settings: Settings, job_id: int) -> SlideJobView:
    job = session.get(SlideJob, job_id)
    if job is None:
        raise UserError(f"No slide job with id {job_id}.")
    return _view(settings, job)


def slide_jobs(session: Session, settings: Settings, *, user: str | None = None, limit: int = 50) -> list[SlideJobView]:
    """The newest jobs, `user`'s only when given."""
    query = select(SlideJob).order_by(SlideJob.id.desc()).limit(limit)
    if user is not None:
        query = query.where(SlideJob.user == user)
    return [_view(settings, j) for j in session.scalars(query)]


def _view(settings: Settings, job: SlideJob) -> SlideJobView:
    verdict = SlideVerdict.from_summary(job.result) if job.result else None
    return SlideJobView(
        job.id,
        job.run_id,
        job.slide_name,
        job.user,
        job.status,
        job.created_at,
        job.started_at,
        job.finished_at,
        job.done,
        job.total,
        job.error,
        verdict,
        settings.slide_jobs_dir / str(job.id),
    )


def load_heat_map(view: SlideJobView, classes: tuple[str, ...]):
    """The job's heat map (core/slides/outputs.py HeatMap) from its files."""
    from core.slides.outputs import HeatMap, class_colour

    with np.load(view.folder / "heatmap.npz") as z:
        cell, thumb = z["cell"], z["thumbnail"]
        return HeatMap(
            classes=classes,
            colours=tuple(class_colour(k) for k in range(len(classes))),
            predicted=z["predicted"],
            probability=z["probability"],
            thumbnail_width=int(thumb[0]),
            thumbnail_height=int(thumb[1]),
            cell_width=float(cell[0]),
            cell_height=float(cell[1]),
            kind=view.verdict.probability_kind if view.verdict else "raw",
        )


def slide_models(session: Session, settings: Settings) -> dict[int, Any]:
    """Succeeded runs whose model file records the scale of its tiles (they can classify slides):
    run id -> core/slides/scale.py ModelScale, newest first."""
    found = {}
    for run_id in session.scalars(select(Run.id).where(Run.status == RunStatus.succeeded).order_by(Run.id.desc())):
        path = model_path(settings, run_id)
        try:
            stat = path.stat()
        except OSError:
            continue
        scale = _file_scale(str(path), stat.st_mtime_ns, stat.st_size)
        if scale is not None:
            found[run_id] = scale
    return found


@functools.lru_cache(maxsize=4096)
def _file_scale(path: str, mtime_ns: int, size: int):
    """A model file's scale, read once per version of the file (the Predict page asks on every rerun)."""
    try:
        return model_scale(read_description(Path(path)))
    except UserError:  # a damaged file: the Runs page says so; here it just cannot classify
        return None


def overlay(view: SlideJobView, classes: tuple[str, ...]) -> np.ndarray:
    """The heat map as an RGBA image the size of the job's thumbnail: each tile in its class's colour,
    as opaque as its probability (at most 75%, so the tissue shows through), clear where no tile."""
    heat = load_heat_map(view, classes)
    colours = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in heat.colours], dtype=np.uint8)
    grid = np.zeros((*heat.predicted.shape, 4), dtype=np.uint8)
    tiled = ~np.isnan(heat.predicted)
    grid[tiled, :3] = colours[heat.predicted[tiled].astype(int)]
    grid[tiled, 3] = np.clip(heat.probability[tiled] * 0.75 * 255, 0, 255).astype(np.uint8)
    # Cell (r, c) covers [c * cell_width, (c + 1) * cell_width) of the thumbnail across, likewise down.
    # Past the grid's last whole tile there is none: a clear border (index -1 reads the clear cell added).
    grid = np.concatenate([grid, np.zeros((grid.shape[0], 1, 4), np.uint8)], axis=1)
    grid = np.concatenate([grid, np.zeros((1, grid.shape[1], 4), np.uint8)], axis=0)
    cols = (np.arange(heat.thumbnail_width) / heat.cell_width).astype(int)
    rows = (np.arange(heat.thumbnail_height) / heat.cell_height).astype(int)
    cols[cols >= grid.shape[1] - 1] = -1
    rows[rows >= grid.shape[0] - 1] = -1
    return grid[rows[:, None], cols[None, :]]
