"""Whole slides classified in the background: queue, run, watch, read the results.

A slide of 10,000 tissue tiles takes about ten minutes on a CPU, so classifying one is a job, not a
page request. `queue_slide` checks what can be checked at once (the run has a model file that
records the scale it was trained at; the slide opens and has its microns per pixel; the disk has
room) and adds a `SlideJob` row. The worker (core/jobs/worker.py) claims it like a run and starts
`python -m core _slide JOB` (`run_slide_child`), which tiles the slide at the model's scale, predicts
batch by batch with the configured engine (core/slides/predict.py `classify_slide`), records `done`
of `total` tiles at most once a second, and writes under SLIDE_JOBS_DIR/<id>/:

  summary.json      the verdict (core/slides/outputs.py `summary`)
  slide.tiles.csv   one row per tile; slide.geojson: one square per tile, for QuPath
  heatmap.npz       each tile's class and probability on the tiling's grid (outputs.HeatMap)
  thumbnail.jpg     the slide's thumbnail the heat map lies over; top-CLASS-K.jpg: the most confident tiles

An uploaded slide is removed once its job has ended (the results keep what the pages show); a
slide under IMPORT_ROOTS is read where it lies. The slide's verdict is logged like an image's.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.access.accounts import User
from core.access.limits import check_disk, check_name_length
from core.config import Settings
from core.data.uploads import check_import_path
from core.errors import UserError
from core.inference.model_meta import read_description
from core.slides.reader import SLIDE_SUFFIXES, TIFF_SUFFIXES, open_slide
from core.slides.scale import model_scale
from core.store.db import Run, RunStatus, SlideJob, utcnow
from core.store.engine import engine_of, write_transaction
from core.store.runs import model_path

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PROGRESS_EVERY = 1.0  # seconds between progress writes: a batch can take a tenth of that on a GPU
THUMBNAIL_QUALITY = 88
# Formats that are one file: MRXS and VMS keep their pixels in a folder beside the file, so they
# are classified from where they lie on the server (IMPORT_ROOTS), not uploaded.
UPLOADABLE = tuple(s for s in SLIDE_SUFFIXES if s not in (".mrxs", ".vms", ".vmu")) + TIFF_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Queueing


def check_model(session: Session, settings: Settings, run_id: int) -> None:
    """UserError unless run `run_id` succeeded and its model file records the scale of its tiles."""
    run = session.get(Run, run_id)
    if run is None:
        raise UserError(f"No run with id {run_id}.")
    path = model_path(settings, run_id)
    if run.status != RunStatus.succeeded or not path.is_file():
        raise UserError(f"Run {run_id} has no trained model to classify a slide with.")
    if model_scale(read_description(path)) is None:
        raise UserError(
            f"Run {run_id} was trained on field images of unknown scale, so a slide cannot be cut into tiles like "
            "those it learned from. Train a run on a dataset ingested from whole slides to classify slides."
        )


def check_waiting(session: Session, settings: Settings, user: User) -> None:
    """UserError when `user` already has MAX_QUEUED_RUNS_PER_USER slides waiting or under way: the
    worker is shared, and each waiting upload holds disk."""
    limit = settings.max_queued_runs_per_user
    waiting = session.scalar(
        select(func.count())
        .select_from(SlideJob)
        .where(SlideJob.user == user.name, SlideJob.status.in_([RunStatus.queued, RunStatus.running]))
    )
    if limit > 0 and waiting >= limit:
        raise UserError(
            f"You ({user.name}) already have {waiting} slide(s) waiting or being classified, the "
            f"MAX_QUEUED_RUNS_PER_USER limit of {limit} per person, which keeps the worker shared. Wait "
            "for one to finish, or cancel one, then try again."
        )


def check_slide(path: Path, mpp: float | None) -> None:
    """UserError unless the slide at `path` opens and has (or is given) its microns per pixel (a
    plain TIFF of one field is not a slide: it is classified as an image)."""
    from core.slides.reader import is_slide_path

    if not is_slide_path(path):
        raise UserError(
            f"{path.name} is not a whole-slide image (SVS, NDPI, MRXS, SCN, VMS, BIF, CZI or pyramidal "
            "TIFF); an image of one microscope field is classified as an image, not as a slide."
        )
    with open_slide(path, mpp):
        pass


def store_upload(settings: Settings, name: str, data: BinaryIO, limit_bytes: int) -> Path:
    """Copy an uploaded slide into SLIDE_UPLOADS_DIR in chunks, refusing it past `limit_bytes` or the
    disk's limit; its path there. Nothing is left behind on a refusal."""
    check_name_length(name, "A slide's file name")
    suffix = Path(name).suffix.lower()
    if suffix not in UPLOADABLE:
        raise UserError(
            f"{name} is not a whole-slide file that can be uploaded ({', '.join(UPLOADABLE)}); MRXS and "
            "VMS slides keep their pixels in a folder: put them under a server folder and give its path."
        )
    settings.slide_uploads_dir.mkdir(parents=True, exist_ok=True)
    target = settings.slide_uploads_dir / f"{uuid.uuid4().hex}{suffix}"
    written = 0
    try:
        with open(target, "wb") as out:
            while chunk := data.read(CHUNK):
                written += len(chunk)
                if written > limit_bytes:
                    raise UserError(f"{name} is larger than the {limit_bytes / 2**20:.0f} MB a slide upload may have.")
                check_disk(settings, len(chunk), what=name)
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def queue_slide(
    Session: sessionmaker,
    settings: Settings,
    user: User,
    run_id: int,
    *,
    name: str,
    path: Path,
    uploaded: bool,
    source: str,
    mpp: float | None = None,
) -> int:
    """Queue slide `path` (an upload stored by `store_upload`, or a path under IMPORT_ROOTS) for run
    `run_id`, checked first; the job's id. An uploaded slide that fails a check is removed."""
    try:
        if not uploaded:
            path = check_import_path(settings, path)
        with Session() as s:
            check_model(s, settings, run_id)
            check_waiting(s, settings, user)
        check_slide(path, mpp)
        with Session.begin() as s:
            job = SlideJob(
                run_id=run_id,
                slide_name=name,
                slide_path=str(path),
                uploaded=uploaded,
                mpp=mpp,
                user=user.name,
                source=source,
            )
            s.add(job)
            s.flush()
            return job.id
    except BaseException:
        if uploaded:
            Path(path).unlink(missing_ok=True)
        raise


def cancel_slide(Session: sessionmaker, settings: Settings, job_id: int, user: User) -> RunStatus:
    """Cancel a queued job at once, a running one at its next batch; its status now. Its owner or
    an editor may."""
    with Session.begin() as s:
        job = s.get(SlideJob, job_id)
        if job is None or not (user.can_edit or job.user == user.name):
            raise UserError(f"No slide job with id {job_id} of yours.")
        if job.status == RunStatus.queued:
            job.status, job.finished_at = RunStatus.cancelled, utcnow()
            _release(settings, job)
        elif job.status == RunStatus.running:
            job.cancel_requested = True
        return job.status


def _release(settings: Settings, job: SlideJob) -> None:
    """An ended job's uploaded slide is let go: its results keep what is shown."""
    if job.uploaded:
        Path(job.slide_path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The worker's side


def claim_next_slide(Session: sessionmaker, worker: str) -> int | None:
    """Atomically take the oldest queued slide job for `worker` (as queue.claim_next takes a run)."""
    with write_transaction(engine_of(Session)) as conn:
        chosen = conn.scalar(
            select(SlideJob.id)
            .where(SlideJob.status == RunStatus.queued)
            .order_by(SlideJob.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if chosen is None:
            return None
        taken = conn.execute(
            update(SlideJob)
            .where(SlideJob.id == chosen, SlideJob.status == RunStatus.queued)
            .values(
                status=RunStatus.running,
                worker=worker,
                heartbeat_at=utcnow(),
                started_at=utcnow(),
                done=0,
                total=None,
                error=None,
            )
        ).rowcount
    return chosen if taken == 1 else None


def has_queued_slide(session: Session) -> bool:
    return session.scalar(select(SlideJob.id).where(SlideJob.status == RunStatus.queued).limit(1)) is not None


def requeue_stale_slides(session: Session, settings: Settings) -> list[int]:
    """Running jobs whose process stopped beating (a killed worker) go back to the queue."""
    stale = (SlideJob.status == RunStatus.running) & (
        SlideJob.heartbeat_at < utcnow() - timedelta(seconds=settings.stale_seconds)
    )
    ids = list(session.scalars(select(SlideJob.id).where(stale)))
    if ids:
        session.execute(
            update(SlideJob).where(SlideJob.id.in_(ids), stale).values(status=RunStatus.queued, worker=None)
        )
    return ids


def record_exit(Session: sessionmaker, settings: Settings, job_id: int, worker: str, code: int, output: str) -> None:
    """A slide process ended: one that recorded no result was killed or crashed hard."""
    with Session.begin() as s:
        job = s.get(SlideJob, job_id)
        if job is None or job.status != RunStatus.running or job.worker != worker:
            return
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        job.status, job.finished_at = RunStatus.failed, utcnow()
        job.error = f"The process classifying this slide {how} without recording a result (out of memory?). {output}"
        _release(settings, job)


def requeue_on_stop(Session: sessionmaker, job_id: int, worker: str) -> None:
    """The worker is stopping: its running job goes back to the queue, to start again."""
    with Session.begin() as s:
        s.execute(
            update(SlideJob)
            .where(SlideJob.id == job_id, SlideJob.worker == worker, SlideJob.status == RunStatus.running)
            .values(status=RunStatus.queued, worker=None)
        )


class _Progress:
    """The child's progress and cancel checks, written to the job's row at most once a second."""

    def __init__(self, Session: sessionmaker, job_id: int):
        self.Session, self.job_id, self.last, self.cancel = Session, job_id, 0.0, False

    def __call__(self, done: int, total: int) -> None:
        if time.monotonic() - self.last < PROGRESS_EVERY and done < total:
            return
        self.last = time.monotonic()
        with self.Session.begin() as s:
            s.execute(
                update(SlideJob).where(SlideJob.id == self.job_id).values(done=done, total=total, heartbeat_at=utcnow())
            )
            self.cancel = bool(s.scalar(select(SlideJob.cancel_requested).where(SlideJob.id == self.job_id)))

    def cancelled(self) -> bool:
        return self.cancel


def execute_slide_job(Session: sessionmaker, settings: Settings, job_id: int) -> None:
    """Classify a claimed job's slide and record its result (or its error, in a reader's words)."""
    from core.slides.predict import SlideCancelled, classify_slide

    with Session() as s:
        job = s.get(SlideJob, job_id)
        run_id, path, mpp, source, name = job.run_id, Path(job.slide_path), job.mpp, job.source, job.slide_name
        user = User(job.user, "viewer")  # the log names who asked; what they may do was checked when queued
    progress = _Progress(Session, job_id)
    status, error, result = RunStatus.succeeded, None, None
    try:
        pred = classify_slide(
            Session,
            settings,
            user,
            path,
            run_id=run_id,
            source=source,
            mpp=mpp,
            progress=progress,
            cancelled=progress.cancelled,
        )
        result = write_results(settings, job_id, pred, path, mpp, name)
        _log(Session, settings, pred, path, name, user.name, source)
    except SlideCancelled:
        status = RunStatus.cancelled
    except UserError as exc:
        status, error = RunStatus.failed, exc.for_page()
    except Exception:
        log.exception("slide job %d failed", job_id)
        status, error = (
            RunStatus.failed,
            "Classifying this slide failed unexpectedly; the worker's log has the details.",
        )
    with Session.begin() as s:
        job = s.get(SlideJob, job_id)
        job.status, job.finished_at, job.error, job.result = status, utcnow(), error, result
        if result is not None:
            job.done = job.total = result["tiles"]["kept"]
        _release(settings, job)


def _log(Session: sessionmaker, settings: Settings, pred, path: Path, name: str, user: str, source: str) -> None:
    """The slide's verdict in the prediction log, under the name it was sent with (an upload is stored
    under a name of our own)."""
    from dataclasses import replace

    from core.inference import prediction_log
    from core.slides.predict import log_entry

    entry = replace(log_entry(pred, path, user, source), image_name=name)
    with Session.begin() as s:
        prediction_log.record(s, [entry])
        prediction_log.prune(s, settings)


def write_results(settings: Settings, job_id: int, pred, path: Path, mpp: float | None, name: str) -> dict[str, Any]:
    """The job's files (see the module docstring); the summary, naming the slide `name`."""
    from core.slides.outputs import heat_map, summary, write_geojson, write_tile_csv

    folder = settings.slide_jobs_dir / str(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "slide.tiles.csv", "w", encoding="utf-8", newline="") as f:
        write_tile_csv(f, pred)
    with open(folder / "slide.geojson", "w", encoding="utf-8") as f:
        write_geojson(f, pred)
    heat = heat_map(pred)
    np.savez_compressed(
        folder / "heatmap.npz",
        predicted=heat.predicted,
        probability=heat.probability,
        cell=np.array([heat.cell_width, heat.cell_height]),
        thumbnail=np.array([heat.thumbnail_width, heat.thumbnail_height]),
    )
    with open_slide(path, mpp) as slide:
        thumb = slide.thumbnail(max(heat.thumbnail_width, heat.thumbnail_height))
        thumb.resize((heat.thumbnail_width, heat.thumbnail_height)).save(
            folder / "thumbnail.jpg", quality=THUMBNAIL_QUALITY
        )
        for label, tops in pred.top_tiles.items():
            for k, top in enumerate(tops):
                tile = slide.region(top.x, top.y, pred.scale.tile_px, pred.scale.mpp)
                tile.save(folder / f"top-{pred.classes.index(label)}-{k}.jpg", quality=THUMBNAIL_QUALITY)
    result = summary(pred)
    result["slide"]["name"] = name
    (folder / "summary.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


def delete_job_files(settings: Settings, job_id: int) -> None:
    shutil.rmtree(settings.slide_jobs_dir / str(job_id), ignore_errors=True)
