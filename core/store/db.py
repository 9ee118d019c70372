"""Database models and sessions (SQLAlchemy 2.0). SQLite file by default, PostgreSQL by URL.

Each pipeline stage writes its own tables and only reads the previous stage's:
datasets/images -> splits/split_members -> runs (config incl. augmentation) -> epoch_metrics,
predictions. Sessions are made by the caller (`with Session.begin() as s:`) and passed in.

An id is never given twice, even after its row is deleted, so that nothing named by an id (a run's
folder runs/<id>/, a page's selection) can be taken for a newer row's. PostgreSQL's sequences never
go back; SQLite needs AUTOINCREMENT (`sqlite_autoincrement` on every table with an integer id).
It is set only when a table is created: a SQLite table made before keeps SQLite's default,
which gives the largest id again once its row is deleted (caches are keyed by content, so that
is harmless for them).

The schema is made and changed by the migrations in core/store/migrations (make_engine runs the
ones a database lacks): a change to a model here needs a new revision there.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Names that come from outside (datasets, classes, groups, presets, users) are String(NAME_LENGTH);
# core/access/limits.py check_name_length refuses longer ones before PostgreSQL would.
NAME_LENGTH = 200


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    classes: Mapped[list[Any]] = mapped_column()  # sorted class names; index = label
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Who added it (a user name); None where unknown: older records, library calls.
    created_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)
    # True: its specimen groups were estimated from file numbers (core/data/groups.py), not given, so
    # every figure that rests on them says "estimated specimens".
    groups_estimated: Mapped[bool | None] = mapped_column(default=None)
    # The scale its images were taken at, so a model trained on it records it (core/slides/scale.py):
    # tiles cut from whole slides are tile_px pixels at tile_mpp microns per pixel; microscope fields
    # have tile_px None and tile_mpp the value given at ingest, or None where unknown.
    tile_px: Mapped[int | None] = mapped_column(default=None)
    tile_mpp: Mapped[float | None] = mapped_column(default=None)

    images: Mapped[list[Image]] = relationship(back_populates="dataset", cascade="all, delete-orphan")
    skipped: Mapped[list[SkippedFile]] = relationship(cascade="all, delete-orphan")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("dataset_id", "sha256"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))  # class name
    sha256: Mapped[str] = mapped_column(String(64))
    stored_path: Mapped[str] = mapped_column(Text)  # relative to APP_HOME
    original_name: Mapped[str] = mapped_column(Text)  # path inside the source, e.g. "CLL/001.tif"
    width: Mapped[int]
    height: Mapped[int]
    mode: Mapped[str] = mapped_column(String(20))  # PIL mode before conversion to RGB
    group: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)  # specimen / patient

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class SkippedFile(Base):
    """A file that ingest did not take, with the reason (shown to the user)."""

    __tablename__ = "skipped_files"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)


class DatasetVersion(Base):
    """One state of a dataset's contents, never changed once made (core/data/versions.py): which
    images it held, each with its class and group (DatasetVersionImage). Numbered 1, 2, 3... per
    dataset; every ingest that changes the images, relabel or change of groups makes the next one.
    The images themselves are stored once, by content: a version names them, it copies nothing."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "number"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)  # None: unknown
    note: Mapped[str] = mapped_column(Text, default="")
    counts: Mapped[dict[str, Any]] = mapped_column()  # class -> images of that class in this version


class DatasetVersionImage(Base):
    """An image of a dataset version, with the class and group it has in that version."""

    __tablename__ = "dataset_version_images"

    version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True)
    # Indexed: deleting a dataset deletes its images one by one, each looked up here by its id.
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))  # class name in this version
    group: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)


class Slide(Base):
    """A whole-slide image a dataset's tiles were cut from (core/data/slide_ingest.py).

    Its tiles are the dataset's images whose group is `file_name`, so splits keep them together.
    source_path is where the slide lies on the server when it was ingested from there, so the
    consistency check can tell when it changed (size and mtime, then sha256); None for a copy
    that was removed after ingest (an upload).
    """

    __tablename__ = "slides"
    __table_args__ = (UniqueConstraint("dataset_id", "file_name"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))  # class name
    file_name: Mapped[str] = mapped_column(String(NAME_LENGTH))  # unique in the dataset; its tiles' group
    source_path: Mapped[str | None] = mapped_column(Text, default=None)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float]  # seconds since the epoch, as the file system gave it at ingest
    sha256: Mapped[str] = mapped_column(String(64))
    mpp: Mapped[float]  # microns per level-0 pixel, from the file or given at ingest
    vendor: Mapped[str] = mapped_column(String(100))
    width: Mapped[int]
    height: Mapped[int]
    tiling: Mapped[str] = mapped_column(Text)  # core.slides.tiling.Tiling.to_json
    tiles_kept: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Split(Base):
    """A stored assignment of source images to train/val/test, made before any augmentation.

    protocol: "holdout" (one fold), "kfold" (folds 0..k-1) or "paper-leaky" (every image in the
    pool; the run augments first and splits the augmented copies, as the paper did).
    """

    __tablename__ = "splits"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    protocol: Mapped[str] = mapped_column(String(20))
    grouped: Mapped[bool]
    seed: Mapped[int]
    params: Mapped[dict[str, Any]] = mapped_column()  # test_fraction, val_fraction, folds
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    members: Mapped[list[SplitMember]] = relationship(cascade="all, delete-orphan")


class SplitMember(Base):
    __tablename__ = "split_members"
    __table_args__ = (UniqueConstraint("split_id", "fold", "image_id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    split_id: Mapped[int] = mapped_column(ForeignKey("splits.id", ondelete="CASCADE"), index=True)
    fold: Mapped[int]
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    part: Mapped[str] = mapped_column(String(10))  # train | val | test | pool


class AugmentationPreset(Base):
    """Named augmentation settings saved by users; a run copies the values into its config."""

    __tablename__ = "augmentation_presets"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    params: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)


class RunStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ENDED = (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled)  # a run or slide job that is over


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    split_id: Mapped[int | None] = mapped_column(ForeignKey("splits.id"), default=None)
    fold: Mapped[int] = mapped_column(default=0)
    experiment: Mapped[str] = mapped_column(String(32), index=True)  # shared by the folds of one k-fold
    config: Mapped[dict[str, Any]] = mapped_column()  # RunConfig as JSON
    seed: Mapped[int]
    status: Mapped[RunStatus] = mapped_column(Enum(RunStatus, native_enum=False), default=RunStatus.queued)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(
        String(NAME_LENGTH), default=None
    )  # MAX_QUEUED_RUNS_PER_USER counts by it
    # What a person calls the run and why they ran it; not part of its config, so they may change.
    name: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)
    notes: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    device: Mapped[str | None] = mapped_column(String(100), default=None)
    weights_used: Mapped[str | None] = mapped_column(Text, default=None)
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # seconds per phase
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)  # epoch/step within the run
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)  # test metrics
    error: Mapped[str | None] = mapped_column(Text, default=None)
    log_tail: Mapped[str | None] = mapped_column(Text, default=None)
    # Filled by the background worker.
    pid: Mapped[int | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # Times a worker has claimed the run since a person last queued it; a run whose workers keep
    # dying is failed after a few, instead of being retried for ever.
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))

    dataset: Mapped[Dataset] = relationship()
    split: Mapped[Split | None] = relationship()
    epochs: Mapped[list[EpochMetric]] = relationship(cascade="all, delete-orphan", order_by="EpochMetric.epoch")


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("run_id", "epoch"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int]
    train_loss: Mapped[float]
    train_accuracy: Mapped[float]
    val_loss: Mapped[float | None]
    val_accuracy: Mapped[float | None]
    seconds: Mapped[float]
    images_per_second: Mapped[float]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prediction(Base):
    """One test sample's probabilities. aug_index is set only for the paper-leaky protocol,
    whose test samples are augmented copies of source images."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    aug_index: Mapped[int | None] = mapped_column(default=None)
    true_label: Mapped[int]
    predicted_label: Mapped[int]
    probabilities: Mapped[list[Any]] = mapped_column()

    __table_args__ = (Index("ix_predictions_run", "run_id"), {"sqlite_autoincrement": True})


class Worker(Base):
    """A live background worker (`python -m core worker`), as it last reported itself.

    Liveness is the age of heartbeat_at, never the existence of the row or of a pid: a worker
    killed with SIGKILL leaves its row behind, stale, and the next sweep deletes it.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    slots: Mapped[int] = mapped_column(default=1)
    run_ids: Mapped[list[Any]] = mapped_column(default=list)  # runs it is training now
    device: Mapped[str | None] = mapped_column(String(100), default=None)  # as its last run reported


class SignInFailures(Base):
    """Recent failed sign-ins counted under one key (core/access/throttle.py says which keys and limits).

    In the database rather than in server memory, so that no client can reset the count, every
    server process shares it, and a lock outlives a restart.
    """

    __tablename__ = "sign_in_failures"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)  # "pair NAME ADDRESS", "name NAME", ...
    failures: Mapped[int] = mapped_column(default=0)
    last_failure_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)  # old rows are pruned by it


class BrowserSignIn(Base):
    """A browser kept signed in with a password (core/access/remembered.py): the SHA-256 of its
    HttpOnly cookie, never the cookie itself, so a copy of the database signs nobody in."""

    __tablename__ = "browser_sign_ins"

    cookie_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    signed_in_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class SlideJob(Base):
    """A whole slide to classify with a run's model, in the background (core/jobs/slide_jobs.py): the
    worker tiles it at the model's scale and predicts batch by batch, recording `done` of `total`
    tiles as it goes, then writes its results under SLIDE_JOBS_DIR/<id>/ (the verdict, the heat map,
    the per-tile CSV and the GeoJSON for QuPath). `slide_path` is the uploaded copy (`uploaded`: ours to
    remove) or the slide's place under IMPORT_ROOTS."""

    __tablename__ = "slide_jobs"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    slide_name: Mapped[str] = mapped_column(String(NAME_LENGTH))  # the file's name, as given
    slide_path: Mapped[str] = mapped_column(Text)
    uploaded: Mapped[bool] = mapped_column(default=False)
    mpp: Mapped[float | None] = mapped_column(default=None)  # given for a slide whose file records none
    user: Mapped[str] = mapped_column(String(NAME_LENGTH))
    source: Mapped[str] = mapped_column(String(10))  # "page", "api" or "cli": where it was asked for, as the log says
    status: Mapped[RunStatus] = mapped_column(Enum(RunStatus, native_enum=False), default=RunStatus.queued, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    done: Mapped[int] = mapped_column(default=0)  # tiles classified so far
    total: Mapped[int | None] = mapped_column(default=None)  # tissue tiles; None until tiled
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)  # core/slides/outputs.py summary


class ModelApproval(Base):
    """An editor's approval of a run's model for its class set (core/inference/approval.py).

    class_set is the model's sorted class names joined by "/" (class names are folder names, which
    cannot hold one). Approving a run ends the class set's previous approval (withdrawn_* set to the
    new approver, replaced_by to the new row); rows are never deleted, so all of them are the history
    and the current approval is the latest row not withdrawn. Deleting the run sets run_id to NULL
    (the approval then names no usable model, and says so) while run_label and model_sha256 keep
    which model it was.
    """

    __tablename__ = "model_approvals"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    class_set: Mapped[str] = mapped_column(Text, index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    run_label: Mapped[str] = mapped_column(Text)  # e.g. "run 3 · lymphoma", as it was when approved
    model_sha256: Mapped[str] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(Text, default="")
    approved_by: Mapped[str] = mapped_column(String(NAME_LENGTH))
    approved_at: Mapped[datetime] = mapped_column(default=utcnow)
    withdrawn_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH), default=None)
    withdrawn_at: Mapped[datetime | None] = mapped_column(default=None)
    replaced_by: Mapped[int | None] = mapped_column(default=None)  # the approval that ended this one


class PredictionLog(Base):
    """One image classified by the Predict page, the API or the command line (core/inference/prediction_log.py).

    run_id is a plain number, not a foreign key: the log says what happened and keeps the id of a
    run deleted since (ids are never given twice; model_sha256 names the model file either way).
    Rows older than PREDICTION_LOG_DAYS are pruned. stored_path is set with PREDICTION_LOG_IMAGES=1,
    or for a referred image with REVIEWS=1: the image's bytes under APP_HOME, named by their sha256.
    """

    __tablename__ = "prediction_log"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user: Mapped[str] = mapped_column(String(NAME_LENGTH))
    source: Mapped[str] = mapped_column(String(10))  # page | api | cli
    run_id: Mapped[int] = mapped_column(index=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_name: Mapped[str] = mapped_column(Text)
    width: Mapped[int]
    height: Mapped[int]
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # a whole slide's file passes 2 GB
    probabilities: Mapped[dict[str, Any]] = mapped_column()  # class -> probability, of probability_kind
    probability_kind: Mapped[str] = mapped_column(String(20))  # calibrated | raw
    predicted: Mapped[str] = mapped_column(String(NAME_LENGTH))
    refer: Mapped[bool | None] = mapped_column(default=None)  # None: the model has no refer band
    threshold: Mapped[float | None] = mapped_column(default=None)
    # The accuracy the threshold promises for the predictions it lets through (with 95% confidence,
    # core/evaluation/calibration.py refer_band); None: no refer band, or logged before it was kept.
    refer_target: Mapped[float | None] = mapped_column(default=None)
    stored_path: Mapped[str | None] = mapped_column(Text, default=None)  # relative to APP_HOME


class FailuresSeen(Base):
    """Up to when each user has seen the runs that failed (core/jobs/manage.py): the app announces
    the failures newer than that to them, in its sidebar and on the Runs page."""

    __tablename__ = "failures_seen"

    user: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    seen_until: Mapped[datetime]  # the finish time of the newest failure they dismissed
