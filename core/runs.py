"""A training run from stored records to stored results:
dataset -> split -> decode/resize -> augment the training part -> train -> evaluate -> predictions.

`create_runs` records what to do (one run, or one per fold for k-fold); `execute_run` does it and
writes every result to the database as it goes. The CLI calls both in the foreground; the worker
calls `execute_run` in the background.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from core import augment, data, splits
from core.config import Settings
from core.datasets import get_dataset
from core.db import EpochMetric, Prediction, Run, RunStatus, utcnow
from core.errors import UserError
from core.model import build_model, check_weights
from core.run_config import RunConfig
from core.train import Data, describe_device, fit, pick_device, predict_logits

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def create_runs(session: Session, settings: Settings, config: RunConfig) -> list[Run]:
    """Record queued runs for `config`: one, or one per fold for k-fold. Makes (or reuses) the split."""
    dataset = get_dataset(session, config.dataset)
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
        )
        for fold in folds
    ]
    session.add_all(runs)
    session.flush()
    return runs


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise UserError(f"No run with id {run_id}. `python -m core runs` lists them.")
    return run


def run_dir(settings: Settings, run_id: int) -> Path:
    return settings.runs_dir / str(run_id)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temp file, then rename: no reader ever sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Recorder:
    """Training callback: epoch metrics and progress to the database, checkpoints to disk."""

    def __init__(self, Session: sessionmaker, run_id: int, directory: Path, progress: Progress | None, extra: dict[str, Any]):
        self.Session, self.run_id, self.dir, self.progress = Session, run_id, directory, progress
        self.extra = extra  # stored in each checkpoint (class names, image size)
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
                run.progress = {"epoch": epoch, "step": step, "steps": steps}
                run.heartbeat_at = utcnow()
                self._stop = run.cancel_requested

    def on_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: dict[str, Any], is_best: bool) -> None:
        checkpoint = {**checkpoint, **self.extra}
        save_atomic(checkpoint, self.dir / "last.pt")
        if is_best:
            save_atomic(checkpoint, self.dir / "best.pt")
        with self.Session.begin() as s:
            # Replace, not append: a resumed run may redo an epoch it had not finished recording.
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
        log.info("run %d epoch %d: %s", self.run_id, epoch, {k: round(v, 4) for k, v in metrics.items()})

    def should_stop(self) -> bool:
        return self._stop


def _expand(arrays: list[np.ndarray], labels: list[int], n_classes: int, config: RunConfig, progress: Progress | None):
    from PIL import Image as PILImage

    pil = [PILImage.fromarray(a) for a in arrays]
    cb = (lambda done, total: progress("augment", done, total)) if progress else None
    images, aug_labels, sources = augment.expand(pil, labels, config.per_class, config.augment_params, config.seed,
                                                  progress=cb, num_classes=n_classes)
    return [np.asarray(im, dtype=np.uint8) for im in images], aug_labels, sources


def _prepare(session: Session, settings: Settings, run: Run, config: RunConfig, progress: Progress | None):
    """Tensors for training, validation and test, plus what each test sample is (image id, aug index)."""
    classes = run.dataset.classes
    parts = splits.split_parts(session, run.split, run.fold)
    index = {name: i for i, name in enumerate(classes)}
    decode_cb = (lambda d, t: progress("decode", d, t)) if progress else None

    if run.split.protocol == "paper-leaky":
        # The paper's protocol: augment every image, then split the augmented copies.
        pool = parts["pool"]
        arrays = data.load_arrays(settings, pool, config.image_size, decode_cb)
        aug, aug_labels, sources = _expand(arrays, [index[im.label] for im in pool], len(classes), config, progress)
        (assignment,) = splits.assign_parts(
            [str(label) for label in aug_labels], None, protocol="holdout", seed=config.seed,
            test_fraction=config.test_fraction, val_fraction=config.val_fraction,
        )
        pick = lambda part: [i for i, p in enumerate(assignment) if p == part]  # noqa: E731
        x = {part: [aug[i] for i in pick(part)] for part in ("train", "val", "test")}
        y = {part: [aug_labels[i] for i in pick(part)] for part in ("train", "val", "test")}
        test_ids = [(pool[sources[i]].id, i) for i in pick("test")]
    else:
        train = parts.get("train", [])
        arrays = data.load_arrays(settings, train, config.image_size, decode_cb)
        aug, aug_labels, _ = _expand(arrays, [index[im.label] for im in train], len(classes), config, progress)
        x, y = {"train": aug}, {"train": aug_labels}
        for part in ("val", "test"):
            images = parts.get(part, [])
            x[part] = data.load_arrays(settings, images, config.image_size)
            y[part] = [index[im.label] for im in images]
        test_ids = [(im.id, None) for im in parts.get("test", [])]

    def tensors(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not x[part]:
            size = config.image_size
            return torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return data.to_tensor(x[part]), torch.tensor(y[part], dtype=torch.long)

    tr, va, te = tensors("train"), tensors("val"), tensors("test")
    return Data(tr[0], tr[1], va[0], va[1]), te, test_ids


def execute_run(Session: sessionmaker, settings: Settings, run_id: int, progress: Progress | None = None) -> None:
    """Run a recorded run to the end, writing status, metrics, checkpoints and predictions.

    A failure marks the run failed with its error text and re-raises.
    """
    directory = run_dir(settings, run_id)
    directory.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(directory / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("core").addHandler(handler)
    timings: dict[str, float] = {}
    try:
        device = pick_device(RunConfig.from_dict(get_run_config(Session, run_id)).device)
        with Session.begin() as s:
            run = get_run(s, run_id)
            run.status, run.started_at, run.error = RunStatus.running, utcnow(), None
            run.device, run.heartbeat_at = describe_device(device), utcnow()
        if device.type == "cpu":
            log.warning("run %d: no GPU in use; training on the CPU (slow at 224 px).", run_id)

        with Session() as s:
            run = get_run(s, run_id)
            config = RunConfig.from_dict(run.config)
            classes = list(run.dataset.classes)
            protocol = splits.describe(run.split)
            t0 = time.perf_counter()
            train_data, (x_test, y_test), test_ids = _prepare(s, settings, run, config, progress)
            timings["data_and_augment"] = time.perf_counter() - t0
        log.info("run %d: %d train, %d val, %d test samples; %s", run_id, len(train_data.y_train),
                 len(train_data.y_val), len(y_test), protocol)

        model, weights_used = build_model(len(classes), config.weights)
        with Session.begin() as s:
            get_run(s, run_id).weights_used = weights_used
        log.info("run %d: weights %s, device %s", run_id, weights_used, describe_device(device))

        recorder = Recorder(Session, run_id, directory, progress, {"classes": classes, "image_size": config.image_size})
        t0 = time.perf_counter()
        fit(model, train_data, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            seed=config.seed, device=device, callback=recorder, config=config.to_dict())
        timings["train"] = time.perf_counter() - t0
        if recorder.should_stop():
            with Session.begin() as s:
                run = get_run(s, run_id)
                run.status, run.finished_at, run.timings = RunStatus.cancelled, utcnow(), timings
            return

        # Evaluate the best checkpoint (by validation; the last epoch when there is none).
        t0 = time.perf_counter()
        best = torch.load(directory / "best.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        probs = torch.softmax(predict_logits(model.to(device), x_test, device), 1).numpy()
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
                           "n_train": len(train_data.y_train), "n_val": len(train_data.y_val)}
            run.status, run.finished_at, run.timings = RunStatus.succeeded, utcnow(), timings
        log.info("run %d succeeded: test accuracy %s", run_id, accuracy)
    except BaseException as exc:
        log.exception("run %d failed", run_id)
        with Session.begin() as s:
            run = get_run(s, run_id)
            run.status, run.finished_at, run.timings = RunStatus.failed, utcnow(), timings
            run.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc)
        raise
    finally:
        logging.getLogger("core").removeHandler(handler)
        handler.close()


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
