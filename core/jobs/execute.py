"""A recorded run, from its records to its results, in phases:

    load the run once -> prepare the data -> audit the split -> train -> evaluate -> model file and results

Each phase gets what it needs from the one before and no phase holds a database session across
long work (decoding, augmentation, the audit, training): sessions are short and write what a phase
found. The data pass through the run's two pipelines (core/transforms/pipelines.py): the training
pipeline for the augmented training set, the evaluation pipeline for validation and test, and that
same evaluation pipeline, fitted, goes into the model file (core/inference/model_file.py) with the
weights of the best epoch and the calibration, so a prediction of a test image later gives the
probabilities stored for it now. Predictions are stored raw; the displays calibrate them.

While a run executes, a heartbeat thread stamps the run's row every few seconds and watches for a
cancel request (core/jobs/recording.py). Each finished epoch is recorded, then checkpointed
(last.pt), so after a crash `execute_run` continues from the last checkpoint. Once the model file is
written and the run recorded as succeeded, the checkpoints are deleted (KEEP_CHECKPOINTS=1 keeps
last.pt); a failed or cancelled run keeps them, to be resumed.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from core.config import Settings
from core.data import audit, splits, versions
from core.data.prepare import Prepared, prepare_data
from core.errors import UserError
from core.evaluation import yardstick
from core.evaluation.calibration import run_calibration
from core.inference.model_file import dataset_fingerprint, read_weights, write_model
from core.inference.predict import Predictor
from core.jobs.queue import failure_page_text, failure_text
from core.jobs.recording import BEST_WEIGHTS, CHECKPOINT, Cancelled, Monitor, Recorder, TakenOver
from core.jobs.run_rows import claim_if_queued, finish, mark_running, mean_speed, store_log_tail
from core.slides.scale import META_KEY as SCALE_KEY
from core.slides.scale import scale_meta
from core.store.db import EpochMetric, Image, Prediction, RunStatus, Split, utcnow
from core.store.records import RunProgress, RunSummary
from core.store.runs import get_run, model_path, run_dir
from core.training.loop import Data, NullCallback, describe_device, fit, pick_device, seed_everything
from core.training.model import PaperDenseNet, build_model
from core.training.run_config import RunConfig
from core.transforms.pipelines import EvalPipeline, Progress, TrainPipeline

if TYPE_CHECKING:
    from core.training.distributed import Group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What a run needs from the database, read once at its start (the rows are detached copies)."""

    run_id: int
    created: str  # the run's created_at: with its id, tells its checkpoints from another database's
    config: RunConfig
    classes: list[str]
    protocol: str  # the split, in words
    split: Split
    parts: dict[str, list[Image]]  # the images of each part of the run's fold
    dataset: dict[str, Any]  # name, fingerprint, n_images and version (where known): for the model file
    epochs_recorded: frozenset[int]
    scale: dict[str, Any] | None = None  # the dataset's tile scale, for the model file (core/slides/scale.py)


def load_job(Session: sessionmaker, run_id: int) -> Job:
    with Session() as s:
        run = get_run(s, run_id)
        # The images of the dataset version its split was made over; a split from before versions: today's.
        number = run.split.params.get("version")
        images = (
            s.execute(select(Image.sha256, Image.label).where(Image.dataset_id == run.dataset_id)).all()
            if number is None
            else [
                (im.sha256, im.label) for im in versions.version_images(s, versions.get_version(s, run.dataset, number))
            ]
        )
        return Job(
            run_id=run_id,
            created=run.created_at.isoformat(),
            config=RunConfig.from_dict(run.config),
            classes=list(run.dataset.classes),
            protocol=splits.describe(run.split),
            split=run.split,
            parts=splits.split_parts(s, run.split, run.fold),
            dataset={
                "name": run.dataset.name,
                "fingerprint": dataset_fingerprint(images),
                "n_images": len(images),
                **({} if number is None else {"version": number}),
            },
            epochs_recorded=frozenset(s.scalars(select(EpochMetric.epoch).where(EpochMetric.run_id == run_id))),
            scale=None
            if run.dataset.tile_px is None and run.dataset.tile_mpp is None
            else scale_meta(run.dataset.tile_px, run.dataset.tile_mpp),
        )


def pipelines(config: RunConfig) -> tuple[EvalPipeline, TrainPipeline]:
    """The run's evaluation pipeline (its stain normaliser not fitted yet) and training pipeline."""
    return (
        EvalPipeline(
            image_size=config.image_size, tiles=config.tiles, stain=config.stain_normalisation, tta=config.tta
        ),
        TrainPipeline(
            per_class=config.per_class, augment=config.augment_params, seed=config.seed, hed_jitter=config.hed_jitter
        ),
    )


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - t0


def execute_run(
    Session: sessionmaker,
    settings: Settings,
    run_id: int,
    progress: Progress | None = None,
    *,
    resume: bool = True,
    group: Group | None = None,
) -> None:
    """Run a recorded run to the end, writing status, metrics, checkpoints, the model file and predictions.

    With `resume` (the default), a checkpoint of this run from an earlier, interrupted attempt is
    continued after its epoch; otherwise, or without one, the run starts from scratch. A cancel
    request ends the run `cancelled`, keeping the epochs it finished. A failure marks the run
    failed with its error text and re-raises.

    With `group` (torchrun started several processes, see core/training/distributed.py) every process calls
    this: rank 0 does all of the above on its device, the others only help train (`_follow`).
    """
    if group is not None and not group.is_main:
        _follow(Session, settings, run_id, group)
        return
    claim_if_queued(Session, run_id)
    directory = run_dir(settings, run_id)
    timings: dict[str, float] = {}
    ours = True
    handler: logging.Handler | None = None
    try:  # from here on every way out records how the run ended (a full disk fails even the mkdir)
        directory.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(directory / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("core").addHandler(handler)
        job = load_job(Session, run_id)
        device = pick_device(job.config.device) if group is None else group.device
        checkpoint = _resume_point(job, directory) if resume else None
        mark_running(Session, run_id, describe_device(device), checkpoint)
        if group is not None:  # the other processes resume from the same epoch, or none
            group.broadcast(None if checkpoint is None else checkpoint["epoch"])
        if device.type == "cpu":
            log.warning("run %d: no GPU in use; training on the CPU (slow at 224 px).", run_id)
        with Monitor(Session, run_id, settings.heartbeat_seconds) as monitor:
            _phases(Session, settings, job, device, checkpoint, progress, monitor, timings, group)
    except Cancelled:
        log.info("run %d cancelled; the epochs it finished are kept", run_id)
        finish(Session, run_id, RunStatus.cancelled, timings)
    except TakenOver:
        ours = False  # the other process records the outcome
        log.warning("run %d: stopped here; another process trains it now", run_id)
    except BaseException as exc:
        if isinstance(exc, UserError):  # a message for the user, said in full: a traceback adds nothing
            log.error("run %d failed: %s", run_id, exc)
        else:
            log.exception("run %d failed", run_id)
        finish(Session, run_id, RunStatus.failed, timings, failure_text(exc, run_id), failure_page_text(exc))
        raise
    finally:
        if handler is not None:
            logging.getLogger("core").removeHandler(handler)
            handler.close()
        if ours:
            store_log_tail(Session, run_id, directory)


def _phases(
    Session: sessionmaker,
    settings: Settings,
    job: Job,
    device: torch.device,
    checkpoint: dict[str, Any] | None,
    progress: Progress | None,
    monitor: Monitor,
    timings: dict[str, float],
    group: Group | None,
) -> None:
    def report(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)
        monitor.stage(stage, done, total)  # raises Cancelled when asked to stop

    # data: decode (cached), stain reference and normalisation, augmentation, jitter
    with _timed(timings, "data_and_augment"):
        evaluation, training = pipelines(job.config)
        data = prepare_data(
            settings, job.split, job.parts, job.classes, pipeline=evaluation, train=training, progress=report
        )
    # the split's leak audit and colour-only yardstick, recorded before training
    _audit(Session, settings, job, data, timings)
    # train; the best epoch's weights come back
    model, weights_used = _train(Session, settings, job, data, device, checkpoint, progress, monitor, timings, group)
    # evaluate them through the evaluation pipeline; calibrate on validation
    with _timed(timings, "evaluate"):
        predictor = Predictor(model.to(device).eval(), job.classes, data.pipeline, device)
        val = predictor.score(data.val.x, data.val.owners)
        test = predictor.score(data.test.x, data.test.owners)
        calibration = run_calibration(val, data.val.labels, test, data.test.labels)
    accuracy = float((test.argmax(1) == np.asarray(data.test.labels)).mean()) if len(test) else None
    # the model file, then the results
    write_model(
        model_path(settings, job.run_id),
        model.state_dict(),
        {
            "run_id": job.run_id,
            "run_created": job.created,
            "dataset": job.dataset,
            "classes": job.classes,
            "preparation": data.pipeline.to_dict(),
            "calibration": calibration.to_dict(),
            "config": job.config.to_dict(),
            "test_metrics": {"accuracy": accuracy, "n_test": len(test), "protocol": job.protocol},
            "weights": weights_used,
            "stain_reference_image_id": data.stain_reference_image_id,
            **({} if job.scale is None else {SCALE_KEY: job.scale}),
        },
    )
    _record_results(Session, job, data, test, {"test_accuracy": accuracy, "calibration": calibration}, timings, device)
    _drop_checkpoints(settings, job.run_id)


def _audit(Session: sessionmaker, settings: Settings, job: Job, data: Prepared, timings: dict[str, float]) -> None:
    with _timed(timings, "leak_audit"):
        leak_audit = audit.audit_parts(settings, job.split, job.parts).as_record()
    with _timed(timings, "colour_yardstick"):
        colour_yardstick = yardstick.parts_yardstick(settings, job.split, job.parts, job.classes)
    if leak_audit.warning:
        log.warning("run %d: %s", job.run_id, leak_audit.warning)
    notes = {} if data.stain_reference_image_id is None else {"stain_reference_image_id": data.stain_reference_image_id}
    with Session.begin() as s:
        run = get_run(s, job.run_id)
        run.summary = (
            RunSummary.from_dict(run.summary)
            .replace(**notes, leak_audit=leak_audit, colour_yardstick=colour_yardstick)
            .to_dict()
        )
    log.info(
        "run %d: %d train, %d val, %d test samples; %s",
        job.run_id,
        len(data.train.y),
        len(data.val.y),
        len(data.test.labels),
        job.protocol,
    )


def _train(
    Session: sessionmaker,
    settings: Settings,
    job: Job,
    data: Prepared,
    device: torch.device,
    checkpoint: dict[str, Any] | None,
    progress: Progress | None,
    monitor: Monitor,
    timings: dict[str, float],
    group: Group | None,
) -> tuple[torch.nn.Module, str]:
    """The model with the best epoch's weights (by validation; the last epoch without one)."""
    config = job.config
    seed_everything(config.seed)  # so that every run with this seed starts from the same weights
    model, weights_used = build_model(len(job.classes), config.weights)
    with Session.begin() as s:
        get_run(s, job.run_id).weights_used = weights_used
    log.info("run %d: weights %s, device %s", job.run_id, weights_used, describe_device(device))
    directory = run_dir(settings, job.run_id)
    recorder = Recorder(
        Session,
        job.run_id,
        directory,
        progress,
        {"run_id": job.run_id, "run_created": job.created},
        config.epochs,
        monitor,
    )
    with _timed(timings, "train"):
        fitted = fit(
            model,
            Data(data.train.x, data.train.y, data.val.x, data.val.y),
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            device=device,
            callback=recorder,
            config=config.to_dict(),
            resume=checkpoint,
            compile=config.compile,
            group=group,
            patience=config.patience,
        )
    if recorder.should_stop():
        monitor.check("training")
        raise Cancelled(f"run {job.run_id} cancelled during training")
    _record_stop(Session, job, fitted.stopped_early, fitted.epoch)
    best, _ = read_weights(directory / BEST_WEIGHTS)
    model.load_state_dict(best)
    return model, weights_used


def _record_stop(Session: sessionmaker, job: Job, stopped_early: bool, epoch: int) -> None:
    """Whether early stopping ended training, and after which epoch; the progress bar says so while
    the run is tested."""
    with Session.begin() as s:
        run = get_run(s, job.run_id)
        run.summary = (
            RunSummary.from_dict(run.summary)
            .replace(stopped_early=stopped_early, stopped_at_epoch=epoch if stopped_early else None)
            .to_dict()
        )
        if stopped_early:
            run.progress = RunProgress(
                stage="train", epoch=epoch, epochs=job.config.epochs, stopped_early=True
            ).to_dict()
    if stopped_early:
        log.info("run %d: stopped early after epoch %d of %d", job.run_id, epoch, job.config.epochs)


def _record_results(
    Session: sessionmaker,
    job: Job,
    data: Prepared,
    probs: np.ndarray,
    results: dict[str, Any],
    timings: dict[str, float],
    device: torch.device,
) -> None:
    """Each test image's raw probabilities, the summary, and `succeeded`, in one transaction."""
    predicted = probs.argmax(1) if len(probs) else np.array([], dtype=int)
    with Session.begin() as s:
        s.execute(delete(Prediction).where(Prediction.run_id == job.run_id))
        s.add_all(
            Prediction(
                run_id=job.run_id,
                image_id=image_id,
                aug_index=aug_index,
                true_label=int(t),
                predicted_label=int(p),
                probabilities=[round(float(v), 6) for v in row],
            )
            for (image_id, aug_index), t, p, row in zip(data.test_ids, data.test.labels, predicted, probs)
        )
        run = get_run(s, job.run_id)
        run.summary = (
            RunSummary.from_dict(run.summary)
            .replace(
                **results,
                protocol=job.protocol,
                n_test=len(probs),
                n_train=len(data.train.y),
                n_val=len(data.val.y),
                images_per_second=mean_speed(s, job.run_id),
                gpu_peak_memory_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if device.type == "cuda"
                else None,
            )
            .to_dict()
        )
        run.status, run.finished_at, run.timings = RunStatus.succeeded, utcnow(), timings
    log.info("run %d succeeded: test accuracy %s", job.run_id, results["test_accuracy"])


def _drop_checkpoints(settings: Settings, run_id: int) -> None:
    """After success the model file is what the run keeps; last.pt only with KEEP_CHECKPOINTS=1."""
    directory = run_dir(settings, run_id)
    (directory / BEST_WEIGHTS).unlink(missing_ok=True)
    if not settings.keep_checkpoints:
        (directory / CHECKPOINT).unlink(missing_ok=True)


def _resume_point(job: Job, directory: Path) -> dict[str, Any] | None:
    """This run's last checkpoint, if there is one to continue from; None means start afresh."""
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        log.warning("run %d: cannot read %s (%s); starting from scratch", job.run_id, path, exc)
        return None
    # A folder left over from another database can hold a last.pt under the same run id; and the
    # best epoch's weights must be there for the run to end with them.
    ours = (
        checkpoint.get("run_id") == job.run_id
        and checkpoint.get("run_created") == job.created
        and checkpoint.get("config") == job.config.to_dict()
        and "rng" in checkpoint
    )
    if not ours or checkpoint.get("epoch") not in job.epochs_recorded or not (directory / BEST_WEIGHTS).exists():
        log.warning("run %d: %s is not a resumable checkpoint of this run; starting from scratch", job.run_id, path)
        return None
    log.info("run %d: resuming after epoch %d from %s", job.run_id, checkpoint["epoch"], path)
    return checkpoint


def _follow(Session: sessionmaker, settings: Settings, run_id: int, group: Group) -> None:
    """A process other than rank 0 of a distributed run: the same data preparation and training
    steps as rank 0 and no side effects (rank 0 records status, metrics and checkpoints, and tests).
    If rank 0 stops before training (a failure, a cancel during preparation), torchrun ends this one."""
    job = load_job(Session, run_id)
    epoch = group.broadcast(None)  # rank 0's resume decision
    checkpoint = None
    if epoch is not None:
        checkpoint = torch.load(run_dir(settings, run_id) / CHECKPOINT, map_location="cpu", weights_only=True)
        if checkpoint.get("epoch") != epoch:
            raise RuntimeError(
                f"run {run_id}: last.pt holds epoch {checkpoint.get('epoch')}, rank 0 resumes after {epoch}"
            )
    evaluation, training = pipelines(job.config)
    data = prepare_data(settings, job.split, job.parts, job.classes, pipeline=evaluation, train=training)
    config = job.config
    seed_everything(config.seed)  # as rank 0 does before building its model
    model = PaperDenseNet(len(job.classes))  # no weights to load: DDP starts every process from rank 0's
    fit(
        model,
        Data(data.train.x, data.train.y, data.val.x, data.val.y),
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        device=group.device,
        callback=NullCallback(),
        config=config.to_dict(),
        resume=checkpoint,
        compile=config.compile,
        group=group,
        patience=config.patience,
    )
