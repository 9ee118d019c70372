"""A training run from stored records to stored results:
dataset -> split -> decode/resize -> [stain normalisation] -> augment the training part -> [HED jitter]
-> train -> evaluate ([test-time augmentation]) -> predictions. The bracketed steps are the run's
generalisation switches (RunConfig.stain_normalisation, hed_jitter, tta), off by default.

`create_runs` records what to do (one run, or one per fold for k-fold); `execute_run` does it and
writes every result to the database as it goes. The CLI calls both in the foreground; the worker
(core/jobs/worker.py) calls `execute_run` in a child process.

While a run executes, a heartbeat thread stamps the run's row every few seconds (so a long decode
or augment phase does not look like a dead process) and watches for a cancel request. Each
finished epoch is written to the database and then checkpointed (last.pt), so after a crash
`execute_run` continues from the last checkpoint and the database never lacks an epoch the
checkpoint has.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.data import audit, cache, splits
from core.evaluation import yardstick
from core.transforms import augment, stain, tiles
from core.evaluation.calibration import run_calibration
from core.access.accounts import User, require_editor
from core.config import Settings
from core.data.datasets import get_dataset, lock_dataset
from core.store.db import EpochMetric, Prediction, Run, RunStatus, utcnow
from core.errors import UserError
from core.store.files import atomic_path
from core.jobs.queue import claim_next, failure_text, get_run, log_tail
from core.access.limits import check_disk, check_name_length, check_queue, check_user_queue
from core.training.model import PaperDenseNet, build_model
from core.training.run_config import RunConfig
from core.training.loop import (
    Data,
    NullCallback,
    describe_device,
    fit,
    pick_device,
    predict_proba,
    seed_everything,
)

if TYPE_CHECKING:
    from core.training.distributed import Group

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class Cancelled(Exception):
    """Someone asked the run to stop (cancel_requested); raised between steps of data preparation."""


class TakenOver(Exception):
    """Another process now owns the run (a worker judged this one dead and restarted the run)."""


def create_runs(session: Session, settings: Settings, config: RunConfig, *, user: User | None = None) -> list[Run]:
    """Record queued runs for `config`: one, or one per fold for k-fold. Makes (or reuses) the split.

    `user` (when given) must be an editor; the runs record their name as created_by. Refused
    (UserError, nothing recorded) when the queue would hold more than MAX_QUEUED_RUNS runs, or the
    user's queued runs more than MAX_QUEUED_RUNS_PER_USER, or the files under APP_HOME use more than
    MAX_DISK_GB.
    """
    if user is not None:
        require_editor(user, "launch training runs")
        check_name_length(user.name, "User name")
    # Locked until the caller commits: a delete of the dataset waits for these runs, or they find it gone.
    dataset = lock_dataset(session, get_dataset(session, config.dataset))
    adding = config.folds if config.split == "kfold" else 1
    queued = session.scalar(select(func.count()).select_from(Run).where(Run.status == RunStatus.queued))
    check_queue(settings, queued, adding)
    if user is not None:
        mine = session.scalar(select(func.count()).select_from(Run)
                              .where(Run.status == RunStatus.queued, Run.created_by == user.name))
        check_user_queue(settings, user.name, mine, adding)
    check_disk(settings)
    split = splits.make_split(
        session,
        dataset,
        protocol=config.split,
        seed=config.seed,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        folds=config.folds,
        grouped=config.grouped,
    )
    folds = range(config.folds) if config.split == "kfold" else [config.fold]
    experiment = uuid.uuid4().hex
    runs = [
        Run(
            dataset_id=dataset.id,
            split_id=split.id,
            fold=fold,
            experiment=experiment,
            config=config.replace(fold=fold, grouped=split.grouped).to_dict(),
            seed=config.seed,
            status=RunStatus.queued,
            created_by=user.name if user is not None else None,
        )
        for fold in folds
    ]
    session.add_all(runs)
    session.flush()
    return runs


def run_dir(settings: Settings, run_id: int) -> Path:
    return settings.runs_dir / str(run_id)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file, then rename: no reader ever sees half a checkpoint."""
    # Through a file object: torch.save names the archive after a path's stem, and the temporary
    # file's stem is empty.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class Monitor:
    """A thread that keeps a running run's heartbeat fresh and notices a cancel request.

    It also publishes the data-preparation progress (decode, augment), which the main thread
    only notes in memory, so that phase costs no database writes of its own. If another process
    has taken the run over (a worker judged this one dead and started it again), training here
    stops at the next step rather than train the same run twice.
    """

    def __init__(self, Session: sessionmaker, run_id: int, every: float):
        self.Session, self.run_id, self.every = Session, run_id, every
        self.cancel = threading.Event()
        self.lost = threading.Event()  # taken over
        self._stage: dict[str, Any] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-run-{run_id}", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stopped.set()
        self._thread.join()

    def stage(self, name: str, done: int, total: int) -> None:
        """Note progress of a preparation stage; raises Cancelled when a cancel was requested."""
        self._stage = {"stage": name, "done": done, "total": total}
        self.check(name)

    def check(self, where: str) -> None:
        if self.lost.is_set():
            raise TakenOver(f"run {self.run_id} was taken over by another process during {where}")
        if self.cancel.is_set():
            raise Cancelled(f"run {self.run_id} cancelled during {where}")

    def _loop(self) -> None:
        while not self._stopped.wait(self.every):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat must not end the run; the next one retries
                log.warning("run %d: heartbeat failed", self.run_id, exc_info=True)

    def beat(self) -> None:
        stage, self._stage = self._stage, None
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if stage is not None:
            values["progress"] = stage
        with self.Session.begin() as s:
            s.execute(update(Run).where(Run.id == self.run_id).values(**values))
            cancel, pid = s.execute(select(Run.cancel_requested, Run.pid).where(Run.id == self.run_id)).one()
        if cancel:
            self.cancel.set()
        if pid != os.getpid() and not self.lost.is_set():
            log.error("run %d was taken over by another process (pid %s); this one (pid %d) stops.",
                      self.run_id, pid, os.getpid())
            self.lost.set()


class Recorder:
    """Training callback: epoch metrics and progress to the database, checkpoints to disk."""

    def __init__(self, Session: sessionmaker, run_id: int, directory: Path, progress: Progress | None,
                 extra: dict[str, Any], epochs: int, monitor: Monitor | None = None):
        self.Session, self.run_id, self.dir, self.progress = Session, run_id, directory, progress
        self.extra = extra  # stored in each checkpoint (class names, image size, which run)
        self.epochs = epochs
        self.monitor = monitor
        self._last_write = 0.0
        self._stop = False

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        if self.progress:
            self.progress(f"epoch {epoch}", step, steps)
        now = time.monotonic()
        if now - self._last_write >= 1.0 or step == steps:  # at most once a second
            self._last_write = now
            with self.Session.begin() as s:
                run = s.get(Run, self.run_id)
                run.progress = {"stage": "train", "epoch": epoch, "epochs": self.epochs, "step": step, "steps": steps}
                run.heartbeat_at = utcnow()
                self._stop = run.cancel_requested

    def on_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: dict[str, Any], is_best: bool) -> None:
        # Database first, checkpoint second: a crash in between leaves an epoch recorded but not
        # checkpointed, which the resumed run simply redoes (replacing the row with equal values).
        # The other order would leave a checkpoint for an epoch the database has never seen.
        with self.Session.begin() as s:
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == self.run_id, EpochMetric.epoch == epoch))
            s.add(
                EpochMetric(
                    run_id=self.run_id,
                    epoch=epoch,
                    train_loss=metrics["train_loss"],
                    train_accuracy=metrics["train_accuracy"],
                    val_loss=metrics.get("val_loss"),
                    val_accuracy=metrics.get("val_accuracy"),
                    seconds=metrics["seconds"],
                    images_per_second=metrics["images_per_second"],
                )
            )
            run = s.get(Run, self.run_id)
            if is_best:
                run.summary = {**run.summary, "best_epoch": epoch}
        checkpoint = {**checkpoint, **self.extra}
        if is_best:
            save_atomic(checkpoint, self.dir / "best.pt")
        save_atomic(checkpoint, self.dir / "last.pt")
        log.info("run %d epoch %d: %s", self.run_id, epoch, {k: round(v, 4) for k, v in metrics.items()})

    def should_stop(self) -> bool:
        monitor = self.monitor
        return self._stop or (monitor is not None and (monitor.cancel.is_set() or monitor.lost.is_set()))


def _expand(arrays: list[np.ndarray], labels: list[int], n_classes: int, config: RunConfig, progress: Progress | None):
    from PIL import Image as PILImage

    pil = [PILImage.fromarray(a) for a in arrays]
    cb = (lambda done, total: progress("augment", done, total)) if progress else None
    images, aug_labels, sources = augment.expand(pil, labels, config.per_class, config.augment_params, config.seed,
                                                  progress=cb, num_classes=n_classes, workers=os.cpu_count() or 1)
    return [np.asarray(im, dtype=np.uint8) for im in images], aug_labels, sources


def mean_optical_density(image: np.ndarray) -> float:
    """Mean optical density of an HxWx3 uint8 image over all pixels and channels (0 for white glass)."""
    return float(-np.log((image.astype(np.float64) + 1) / 256).mean())


def choose_stain_reference(arrays: list[np.ndarray], ids: list[int], method: str) -> tuple[int, stain.Normaliser]:
    """The stain-normalisation reference and its normaliser, from the given (training) images only.

    The reference is the image whose mean optical density is the median (a typical stain, neither
    the palest nor the darkest; ties go to the lower image id). If `method` cannot be fitted to it
    (Macenko needs enough stained tissue), the image next closest to the median is tried, and so on.
    Returns (image id, normaliser). Raises UserError when no image will do.
    """
    if not arrays:
        raise UserError("Stain normalisation needs at least one training image to take the reference from.")
    ranked = sorted(range(len(arrays)), key=lambda i: (mean_optical_density(arrays[i]), ids[i]))
    mid = (len(ranked) - 1) // 2
    order = sorted(range(len(ranked)), key=lambda r: (abs(r - mid), r))
    for r in order:
        i = ranked[r]
        try:
            return ids[i], stain.make_normaliser(method, arrays[i])
        except UserError as exc:
            if "Unknown stain normalisation" in str(exc):
                raise
            log.info("stain reference: image %d does not fit %s (%s); trying the next", ids[i], method, exc)
    raise UserError(f"No training image has enough stained tissue to fit {method} stain normalisation; "
                    "train without it (stain_normalisation='none').")


def _normalise(parts: dict[str, list[np.ndarray]], normaliser: stain.Normaliser,
               progress: Progress | None) -> dict[str, list[np.ndarray]]:
    """Every array of every part through `normaliser` (a thread per core: NumPy releases the GIL)."""
    flat = [a for arrays in parts.values() for a in arrays]
    out: list[np.ndarray] = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for a in pool.map(normaliser, flat):
            out.append(a)
            if progress and (len(out) % 16 == 0 or len(out) == len(flat)):
                progress("stain normalisation", len(out), len(flat))
    result, k = {}, 0
    for part, arrays in parts.items():
        result[part], k = out[k : k + len(arrays)], k + len(arrays)
    return result


_JITTER_STREAM = 0x48454A  # keeps the jitter's random stream apart from other uses of the run seed


def _hed_jitter(arrays: list[np.ndarray], config: RunConfig, progress: Progress | None) -> list[np.ndarray]:
    """HED stain jitter (sigma = bias = config.hed_jitter) on each augmented training image, each
    with its own generator seeded by (run seed, sample index): the same run seed gives the same images."""
    if config.hed_jitter <= 0 or not arrays:
        return arrays
    value, seed = float(config.hed_jitter), config.seed % 2**63

    def one(i: int) -> np.ndarray:
        return stain.hed_jitter(arrays[i], np.random.default_rng((seed, _JITTER_STREAM, i)), sigma=value, bias=value)

    out: list[np.ndarray] = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for a in pool.map(one, range(len(arrays))):
            out.append(a)
            if progress and (len(out) % 64 == 0 or len(out) == len(arrays)):
                progress("stain jitter", len(out), len(arrays))
    return out


def _prepare(session: Session, settings: Settings, run: Run, config: RunConfig, progress: Progress | None):
    """Tensors for training, validation and test, what each test sample is (image id, aug index),
    and notes for the run's summary (the stain reference image, when normalising).

    Order: decode/resize -> stain normalisation (optional; reference from the training part) ->
    augment the training part -> HED jitter of the augmented training images (optional).
    """
    classes = run.dataset.classes
    parts = splits.split_parts(session, run.split, run.fold)
    index = {name: i for i, name in enumerate(classes)}
    decode_cb = (lambda d, t: progress("decode", d, t)) if progress else None
    notes: dict[str, Any] = {}
    owners: dict[str, list[int]] = {}  # sample -> index of its source image in the part (tiles)
    normalising = config.stain_normalisation != "none"

    if run.split.protocol == "paper-leaky":
        # The paper's protocol: augment every image, then split the augmented copies. Which images
        # end up in training is only known after augmenting, so the stain reference comes from the
        # whole pool (this protocol has no untouched test images anyway).
        pool = parts["pool"]
        arrays = cache.load_arrays(settings, pool, config.image_size, decode_cb)
        if normalising:
            ref_id, normaliser = choose_stain_reference(arrays, [im.id for im in pool], config.stain_normalisation)
            notes["stain_reference_image_id"] = ref_id
            arrays = _normalise({"pool": arrays}, normaliser, progress)["pool"]
        aug, aug_labels, sources = _expand(arrays, [index[im.label] for im in pool], len(classes), config, progress)
        (assignment,) = splits.assign_parts(
            [str(label) for label in aug_labels], None, protocol="holdout", seed=config.seed,
            test_fraction=config.test_fraction, val_fraction=config.val_fraction,
        )
        pick = lambda part: [i for i, p in enumerate(assignment) if p == part]  # noqa: E731
        x = {part: [aug[i] for i in pick(part)] for part in ("train", "val", "test")}
        y = {part: [aug_labels[i] for i in pick(part)] for part in ("train", "val", "test")}
        x["train"] = _hed_jitter(x["train"], config, progress)  # training copies only
        test_ids = [(pool[sources[i]].id, i) for i in pick("test")]
    else:
        train = parts.get("train", [])
        x, y = {}, {}
        for part in ("train", "val", "test"):
            images = parts.get(part, [])
            x[part], owners[part] = _load_part(settings, images, config, decode_cb if part == "train" else None)
            y[part] = [index[images[i].label] for i in owners[part]]
        if normalising:
            # With tiles too, the reference is a whole training image, as the Predict page refits it.
            whole = x["train"] if not config.tiles else cache.load_arrays(settings, train, config.image_size)
            ref_id, normaliser = choose_stain_reference(whole, [im.id for im in train], config.stain_normalisation)
            notes["stain_reference_image_id"] = ref_id
            x = _normalise(x, normaliser, progress)
        aug, aug_labels, _ = _expand(x["train"], y["train"], len(classes), config, progress)
        x["train"], y["train"] = _hed_jitter(aug, config, progress), aug_labels
        test_ids = [(im.id, None) for im in parts.get("test", [])]

    def tensors(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not x[part]:
            size = config.image_size
            return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return cache.to_tensor(x[part]), torch.tensor(y[part], dtype=torch.long)

    tr, va, te = tensors("train"), tensors("val"), tensors("test")
    return Data(tr[0], tr[1], va[0], va[1]), te, test_ids, notes, (owners if config.tiles else None)


def _load_part(settings: Settings, images: list, config: RunConfig,
               progress: Callable[[int, int], None] | None) -> tuple[list[np.ndarray], list[int]]:
    """A part's samples (whole images resized, or each image's tiles) and each one's source image."""
    if not config.tiles:
        return cache.load_arrays(settings, images, config.image_size, progress), list(range(len(images)))
    arrays, owners = [], []
    for i, image in enumerate(images):
        cut = cache.tile_array(settings, image, config.image_size, config.tiles)
        arrays.extend(cut)
        owners.extend([i] * len(cut))
        if progress:
            progress(i + 1, len(images))
    return arrays, owners


def execute_run(Session: sessionmaker, settings: Settings, run_id: int, progress: Progress | None = None,
                *, resume: bool = True, group: Group | None = None) -> None:
    """Run a recorded run to the end, writing status, metrics, checkpoints and predictions.

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
    _claim_if_queued(Session, run_id)
    directory = run_dir(settings, run_id)
    timings: dict[str, float] = {}
    ours = True
    handler: logging.Handler | None = None
    try:  # from here on every way out records how the run ended (a full disk fails even the mkdir)
        directory.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(directory / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("core").addHandler(handler)
        config = RunConfig.from_dict(get_run_config(Session, run_id))
        device = pick_device(config.device) if group is None else group.device
        checkpoint = _resume_point(Session, run_id, directory) if resume else None
        _mark_running(Session, run_id, device, checkpoint)
        if group is not None:  # the other processes resume from the same epoch, or none
            group.broadcast(None if checkpoint is None else checkpoint["epoch"])
        if device.type == "cpu":
            log.warning("run %d: no GPU in use; training on the CPU (slow at 224 px).", run_id)
        with Monitor(Session, run_id, settings.heartbeat_seconds) as monitor:
            _train_and_test(Session, settings, run_id, config, device, checkpoint, progress, monitor, timings, group)
    except Cancelled:
        log.info("run %d cancelled; the epochs it finished are kept", run_id)
        _finish(Session, run_id, RunStatus.cancelled, timings)
    except TakenOver:
        ours = False  # the other process records the outcome
        log.warning("run %d: stopped here; another process trains it now", run_id)
    except BaseException as exc:
        log.exception("run %d failed", run_id)
        _finish(Session, run_id, RunStatus.failed, timings, failure_text(exc, run_id))
        raise
    finally:
        if handler is not None:
            logging.getLogger("core").removeHandler(handler)
            handler.close()
        if ours:
            _store_log_tail(Session, run_id, directory)


def _claim_if_queued(Session: sessionmaker, run_id: int) -> None:
    """Take a queued run for this process, as a worker would, so that no worker starts it too.
    A run already running was claimed by whoever started this (a worker, the CLI)."""
    with Session() as s:
        status = get_run(s, run_id).status
    if status == RunStatus.queued and claim_next(Session, f"process:{socket.gethostname()}:{os.getpid()}", run_id) is None:
        raise UserError(f"Run {run_id} was just taken by a background worker; it trains there.")


def _resume_point(Session: sessionmaker, run_id: int, directory: Path) -> dict[str, Any] | None:
    """This run's last checkpoint, if there is one to continue from; None means start afresh."""
    path = directory / "last.pt"
    if not path.exists():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        log.warning("run %d: cannot read %s (%s); starting from scratch", run_id, path, exc)
        return None
    with Session() as s:
        run = get_run(s, run_id)
        recorded = s.scalar(select(EpochMetric.id).where(EpochMetric.run_id == run_id,
                                                         EpochMetric.epoch == checkpoint.get("epoch")))
        # A folder left over from another database can hold a last.pt under the same run id.
        ours = (checkpoint.get("run_id") == run_id and checkpoint.get("run_created") == run.created_at.isoformat()
                and checkpoint.get("config") == run.config and "rng" in checkpoint)
    if not ours or recorded is None:
        log.warning("run %d: %s is not a resumable checkpoint of this run; starting from scratch", run_id, path)
        return None
    log.info("run %d: resuming after epoch %d from %s", run_id, checkpoint["epoch"], path)
    return checkpoint


def _mark_running(Session: sessionmaker, run_id: int, device: torch.device, checkpoint: dict[str, Any] | None) -> None:
    with Session.begin() as s:
        run = get_run(s, run_id)
        run.status, run.error, run.finished_at = RunStatus.running, None, None
        run.device, run.heartbeat_at, run.pid = describe_device(device), utcnow(), os.getpid()
        if checkpoint is None:
            run.started_at, run.summary = utcnow(), {}
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id))
        else:
            run.started_at = run.started_at or utcnow()
            # Epochs after the checkpoint were recorded but not checkpointed; they are redone.
            s.execute(delete(EpochMetric).where(EpochMetric.run_id == run_id, EpochMetric.epoch > checkpoint["epoch"]))
        s.execute(delete(Prediction).where(Prediction.run_id == run_id))


# Seconds between attempts to record how a run ended while the database refuses the write (locked
# beyond its busy timeout, or its disk full, which may be why the run is ending).
FINISH_RETRY_SECONDS = (0.5, 1.0, 2.0, 4.0)


def _finish(Session: sessionmaker, run_id: int, status: RunStatus, timings: dict[str, float], error: str | None = None) -> None:
    """Record how the run ended, trying again while the database refuses. If it never accepts, the
    run stays `running` without a heartbeat: the worker that started this process records the
    failure when it exits, or else the stale-run sweep takes the run back."""
    for delay in (*FINISH_RETRY_SECONDS, None):
        try:
            with Session.begin() as s:
                run = s.get(Run, run_id)
                if run is not None:  # None: the run id was wrong to begin with
                    run.status, run.finished_at, run.timings, run.error = status, utcnow(), timings, error
            return
        except OperationalError:
            if delay is None:
                log.exception("run %d: could not record that it %s", run_id, status.value)
                return
            log.warning("run %d: the database refused to record that it %s; trying again in %g s",
                        run_id, status.value, delay, exc_info=True)
            time.sleep(delay)


def _store_log_tail(Session: sessionmaker, run_id: int, directory: Path) -> None:
    """The end of train.log on the run's row, for the Runs page; left out if the database refuses."""
    try:
        with Session.begin() as s:
            run = s.get(Run, run_id)
            if run is not None:
                run.log_tail = log_tail(directory / "train.log")
    except OperationalError:
        log.warning("run %d: could not store the end of its log", run_id, exc_info=True)


def _train_and_test(Session: sessionmaker, settings: Settings, run_id: int, config: RunConfig, device: torch.device,
                    checkpoint: dict[str, Any] | None, progress: Progress | None, monitor: Monitor,
                    timings: dict[str, float], group: Group | None = None) -> None:
    def report(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)
        monitor.stage(stage, done, total)  # raises Cancelled when asked to stop

    directory = run_dir(settings, run_id)
    with Session() as s:
        run = get_run(s, run_id)
        classes = list(run.dataset.classes)
        protocol = splits.describe(run.split)
        identity = {"run_id": run_id, "run_created": run.created_at.isoformat()}
        t0 = time.perf_counter()
        train_data, (x_test, y_test), test_ids, notes, owners = _prepare(s, settings, run, config, report)
        timings["data_and_augment"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        leak_audit = audit.audit_split(s, settings, run.split, run.fold).as_record()
        timings["leak_audit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        colour_yardstick = yardstick.split_yardstick(s, settings, run.split, classes, run.fold)
        timings["colour_yardstick"] = time.perf_counter() - t0
    if leak_audit["warning"]:
        log.warning("run %d: %s", run_id, leak_audit["warning"])
    with Session.begin() as s:
        run = get_run(s, run_id)
        run.summary = {**run.summary, **notes, "leak_audit": leak_audit, "colour_yardstick": colour_yardstick}
    log.info("run %d: %d train, %d val, %d test samples; %s", run_id, len(train_data.y_train),
             len(train_data.y_val), len(y_test), protocol)

    # Seeded, so that every run with this seed starts from the same weights (from scratch).
    seed_everything(config.seed)
    model, weights_used = build_model(len(classes), config.weights)
    with Session.begin() as s:
        get_run(s, run_id).weights_used = weights_used
    log.info("run %d: weights %s, device %s", run_id, weights_used, describe_device(device))

    extra = {"classes": classes, "image_size": config.image_size, **identity, **notes}
    recorder = Recorder(Session, run_id, directory, progress, extra, config.epochs, monitor)
    t0 = time.perf_counter()
    fit(model, train_data, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
        seed=config.seed, device=device, callback=recorder, config=config.to_dict(), resume=checkpoint,
        compile=config.compile, group=group)
    timings["train"] = time.perf_counter() - t0
    if recorder.should_stop():
        monitor.check("training")
        raise Cancelled(f"run {run_id} cancelled during training")

    # Evaluate the best checkpoint (by validation; the last epoch when there is none).
    t0 = time.perf_counter()
    best = torch.load(directory / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    probs = predict_proba(model.to(device), x_test, device, tta=config.tta).numpy()
    val_probs = predict_proba(model, train_data.x_val, device, tta=config.tta).numpy()
    y_val = train_data.y_val
    if owners is not None:  # an image's prediction is the vote of its tiles
        probs, y_test = _tile_vote(probs, y_test, owners["test"])
        val_probs, y_val = _tile_vote(val_probs, y_val, owners["val"])
    calibration = run_calibration(val_probs, y_val.tolist(), probs, y_test.tolist())
    timings["evaluate"] = time.perf_counter() - t0
    predicted = probs.argmax(1) if len(probs) else np.array([], dtype=int)
    with Session.begin() as s:
        s.execute(delete(Prediction).where(Prediction.run_id == run_id))
        s.add_all(
            Prediction(run_id=run_id, image_id=image_id, aug_index=aug_index, true_label=int(t),
                       predicted_label=int(p), probabilities=[round(float(v), 6) for v in row])
            for (image_id, aug_index), t, p, row in zip(test_ids, y_test.tolist(), predicted, probs)
        )
        run = get_run(s, run_id)
        accuracy = float((predicted == y_test.numpy()).mean()) if len(probs) else None
        run.summary = {**run.summary, "protocol": protocol, "test_accuracy": accuracy, "n_test": len(probs),
                       "n_train": len(train_data.y_train), "n_val": len(train_data.y_val), "calibration": calibration,
                       "images_per_second": _mean_speed(s, run_id),
                       "gpu_peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                       if device.type == "cuda" else None}
        run.status, run.finished_at, run.timings = RunStatus.succeeded, utcnow(), timings
    log.info("run %d succeeded: test accuracy %s", run_id, accuracy)


def _tile_vote(probs: np.ndarray, labels: torch.Tensor, owners: list[int]) -> tuple[np.ndarray, torch.Tensor]:
    """Per-image probabilities and labels from per-tile ones."""
    if not owners:
        return probs, labels
    n = max(owners) + 1
    image_labels = torch.zeros(n, dtype=torch.long)
    image_labels[torch.tensor(owners)] = labels
    return tiles.vote(probs, np.asarray(owners), n), image_labels


def _follow(Session: sessionmaker, settings: Settings, run_id: int, group: Group) -> None:
    """A process other than rank 0 of a distributed run: the same data preparation and training
    steps as rank 0 and no side effects (rank 0 records status, metrics and checkpoints, and tests).
    If rank 0 stops before training (a failure, a cancel during preparation), torchrun ends this one."""
    config = RunConfig.from_dict(get_run_config(Session, run_id))
    epoch = group.broadcast(None)  # rank 0's resume decision
    checkpoint = None
    if epoch is not None:
        checkpoint = torch.load(run_dir(settings, run_id) / "last.pt", map_location="cpu", weights_only=True)
        if checkpoint.get("epoch") != epoch:
            raise RuntimeError(f"run {run_id}: last.pt holds epoch {checkpoint.get('epoch')}, rank 0 resumes after {epoch}")
    with Session() as s:
        run = get_run(s, run_id)
        n_classes = len(run.dataset.classes)
        train_data, *_ = _prepare(s, settings, run, config, None)
    seed_everything(config.seed)  # as rank 0 does before building its model
    model = PaperDenseNet(n_classes)  # no weights to load: DDP starts every process from rank 0's
    fit(model, train_data, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
        device=group.device, callback=NullCallback(), config=config.to_dict(), resume=checkpoint,
        compile=config.compile, group=group)


def _mean_speed(session: Session, run_id: int) -> float | None:
    """Training images per second over the run's epochs (the first includes compilation)."""
    speeds = session.scalars(select(EpochMetric.images_per_second).where(EpochMetric.run_id == run_id)).all()
    return round(sum(speeds) / len(speeds), 1) if speeds else None


def get_run_config(Session: sessionmaker, run_id: int) -> dict[str, Any]:
    with Session() as s:
        return dict(get_run(s, run_id).config)


def list_runs(session: Session, dataset: str | None = None) -> list[Run]:
    query = select(Run).order_by(Run.id)
    if dataset:
        query = query.where(Run.dataset_id == get_dataset(session, dataset).id)
    return list(session.scalars(query))


def fold_siblings(session: Session, run: Run) -> list[Run]:
    """The runs of the same k-fold experiment, one per fold (just `run` for a holdout)."""
    return list(session.scalars(select(Run).where(Run.experiment == run.experiment).order_by(Run.fold)))
