"""The training loop, readable top to bottom. It knows nothing of databases or web pages:
side effects (metrics to the database, checkpoints, progress bars, cancel) go through a Callback.

Inputs are uint8 image tensors (N, 3, H, W) already resized (and augmented, for training);
`preprocess` turns them into normalised floats on the device.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from core.training.distributed import Group

log = logging.getLogger(__name__)

# ImageNet statistics: right for ImageNet weights, harmless from scratch.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class TrainingError(Exception):
    """The run cannot go on (e.g. a non-finite loss); the message is stored on the run."""


class Callback(Protocol):
    def on_step(self, epoch: int, step: int, steps: int) -> None: ...
    def on_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: dict[str, Any], is_best: bool) -> None: ...
    def should_stop(self) -> bool: ...


class NullCallback:
    def on_step(self, epoch: int, step: int, steps: int) -> None:
        pass

    def on_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: dict[str, Any], is_best: bool) -> None:
        pass

    def should_stop(self) -> bool:
        return False


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global random generator, in types that torch.load(weights_only=True) accepts
    (numpy's key array becomes a list)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    # A checkpoint from a GPU machine resumed on the CPU has no use for the CUDA states (and
    # the reverse has none to restore); dropout then differs, but nothing else does.
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def preprocess(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float32 on `device` (channels_last on CUDA, where the
    convolutions are faster in that layout)."""
    x = x.to(device, non_blocking=True).float().div_(255)
    x = (x - MEAN.to(device)) / STD.to(device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def _autocast(device: torch.device):
    # bf16 on CUDA: same range as fp32, no loss scaling needed. CPU stays fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class Batches:
    """Mini-batches of (x, y), one gather per batch instead of collating sample by sample.

    The tensors may live on the GPU (the training set is uploaded once, so no batch waits on the
    host); the order comes from a CPU generator whose state a checkpoint keeps.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for i in range(0, n, self.batch_size):
            index = order[i : i + self.batch_size]
            yield self.x[index], self.y[index]


def make_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    device: torch.device | None = None,
) -> Batches:
    """Batches of (x, y); on CUDA the tensors are moved to the device once, here."""
    if device is not None and device.type == "cuda":
        x, y = x.to(device), y.to(device)
    return Batches(x, y, batch_size, shuffle=shuffle, seed=seed)


def make_optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in a few launches instead of several per tensor.
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type == "cuda")


def prepare_model(model: nn.Module, device: torch.device, *, compile: bool) -> nn.Module:
    """The module to call for training: on CUDA channels_last and, with `compile`, torch.compile
    with CUDA graphs, which removes the launch overhead of ~200 small layers at small batches.

    Returns `model` itself when not compiling; the compiled wrapper shares its parameters, so
    checkpoints are always taken from `model`. A compiler failure is logged and the eager model
    used: slower, never wrong.
    """
    model.to(device)
    if device.type != "cuda":
        return model
    model.to(memory_format=torch.channels_last)
    if not compile:
        return model
    compiled = torch.compile(model, mode="reduce-overhead")
    # One forward/backward now, so compilation errors surface here; it must not change the
    # model (batch-norm statistics, gradients) or the random streams of the run.
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[device]), _autocast(device):
            x = torch.zeros(2, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
            compiled(x).float().sum().backward()
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager model usable
        log.warning("torch.compile failed (%s: %s); training with the eager model.", type(exc).__name__, exc)
        return model
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return compiled


def train_one_epoch(
    model: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    callback: Callback,
    group: Group | None = None,
) -> dict[str, float]:
    """One pass over `loader`. With `group` (one process of several, see core/training/distributed.py) the
    loader yields this process's slice of each global batch and the metrics cover all processes."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    # Sums stay on the device: one host sync per epoch, not per step.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader, start=1):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # training and evaluation graphs interleave
        x, y = preprocess(x, device), y.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        (loss if group is None else loss * loader.weight).backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        callback.on_step(epoch, step, len(loader))
        if callback.should_stop():
            break
    seconds = time.perf_counter() - t0
    if group is not None:
        loss_sum, correct, seen = group.sum(loss_sum, correct, seen)
    train_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(train_loss):
        raise TrainingError(f"Training loss became {train_loss} in epoch {epoch}; try a lower learning rate.")
    return {
        "train_loss": train_loss,
        "train_accuracy": correct.item() / max(seen, 1),
        "seconds": seconds,
        "images_per_second": seen / seconds if seconds > 0 else 0.0,
    }


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, C) on the CPU, in input order."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with _autocast(device):
            out.append(model(preprocess(x[i : i + batch_size], device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 4 test-time views of (N, C, H, W) images: as they are, mirrored left-right, top-bottom, both."""
    return [x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]


def predict_proba(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 64, *, tta: bool = False
) -> torch.Tensor:
    """Class probabilities (N, C) on the CPU, in input order.

    With `tta`, the softmax is averaged over the 4 views of `tta_views` (histology has no preferred
    orientation, so each flip is an equally valid look at the same tissue); rows still sum to 1.
    """
    if len(x) == 0:
        return torch.empty(0)
    views = tta_views(x) if tta else [x]
    probs = [torch.softmax(predict_logits(model, v, device, batch_size), 1) for v in views]
    return torch.stack(probs).mean(0)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch_size: int = 64
) -> dict[str, float]:
    logits = predict_logits(model, x, device, batch_size)
    return {
        "loss": nn.functional.cross_entropy(logits, y).item(),
        "accuracy": (logits.argmax(1) == y).float().mean().item(),
    }


@dataclass
class EarlyStopping:
    """Early stopping's count: the epochs since the validation loss last fell below its lowest.
    Training is to stop once it reaches `patience` (never with 0)."""

    patience: int
    lowest: float = math.inf
    stale: int = 0

    def update(self, val_loss: float) -> None:
        if val_loss < self.lowest:
            self.lowest, self.stale = val_loss, 0
        else:
            self.stale += 1

    @property
    def due(self) -> bool:
        return 0 < self.patience <= self.stale


@dataclass(frozen=True)
class Fitted:
    """How training ended: the last epoch trained (in part, when cancelled), whether early stopping
    ended it before the last epoch, and that epoch's metrics (empty when a resumed run had no epoch
    left to train)."""

    epoch: int
    stopped_early: bool
    metrics: dict[str, float]


@dataclass
class Data:
    """Tensors for one run: uint8 images and int64 labels; val may be empty."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def fit(
    model: nn.Module,
    data: Data,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    callback: Callback,
    config: dict[str, Any],
    resume: dict[str, Any] | None = None,
    compile: bool = True,
    group: Group | None = None,
    patience: int = 0,
) -> Fitted:
    """Train for `epochs`, or fewer with early stopping; returns how it ended. The best epoch (by
    validation accuracy, then loss; the last one when there is no validation part) is flagged to
    the callback, which keeps its weights: stopping early changes when training ends, not which
    epoch is tested. `patience` > 0 stops once the validation loss has not improved for that many
    epochs in a row (see EarlyStopping; 0 trains every epoch, as the paper does).
    `resume` is a checkpoint this function made: training goes on after its epoch exactly as it
    would have without the interruption (same weights, optimiser moments, RNG streams, shuffling
    order and early-stopping count), so a resumed run ends with the weights of an uninterrupted one.
    `compile` uses torch.compile with CUDA graphs on a GPU (see prepare_model). `group`: this process
    is one of several training together (core/training/distributed.py); every one calls fit with the
    same arguments, and only rank 0 should pass a callback with side effects.
    """
    seed_everything(seed)
    if group is not None:
        group.check_same_data(data)
        model = group.sync_batch_norm(model)
    net = prepare_model(model, device, compile=compile and group is None)  # what we call; `model` holds the weights
    optimizer = make_optimizer(model, lr, device)
    scheduler = None  # the paper uses a constant learning rate; checkpoints keep a slot for one
    loader = make_loader(data.x_train, data.y_train, batch_size, shuffle=True, seed=seed, device=device)
    best, stopping, first_epoch = (-1.0, math.inf), EarlyStopping(patience), 1
    if resume is not None:
        best, first_epoch = _restore(resume, model, optimizer, loader, stopping)
    if patience and not len(data.y_val):
        log.warning("early stopping is on but no validation images can show progress: every epoch is trained")
    train_net = net
    if group is not None:  # DDP for training; validation below calls `net`, with no collectives
        train_net, loader, callback = group.wrap(net), group.shard(loader), group.agreed(callback)
    metrics: dict[str, float] = {}  # the last epoch's
    for epoch in range(first_epoch, epochs + 1):
        if stopping.due:  # the validation loss has not improved for `patience` epochs
            log.info(
                "stopping early after epoch %d: no better validation loss than %.4f for %d epoch(s)",
                epoch - 1,
                stopping.lowest,
                stopping.stale,
            )
            return Fitted(epoch - 1, True, metrics)
        # train
        if group is not None:
            group.seed_epoch(seed, epoch)
        metrics = {"epoch": epoch, **train_one_epoch(train_net, loader, optimizer, device, epoch, callback, group)}
        if callback.should_stop():
            break
        # validate
        if len(data.y_val):
            val = evaluate(net, data.x_val, data.y_val, device, batch_size=max(batch_size, 64))
            metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            score = (metrics["val_accuracy"], metrics["val_loss"])
            is_best = score[0] > best[0] or (score[0] == best[0] and score[1] < best[1])
            stopping.update(metrics["val_loss"])
            if group is not None and patience:  # every process stops after the same epoch: rank 0's count
                stopping.stale = group.broadcast(stopping.stale)
        else:
            score, is_best = (0.0, 0.0), True
        if is_best:
            best = score
        # record and checkpoint
        checkpoint = _checkpoint(model, optimizer, scheduler, loader, epoch, best, stopping, config)
        callback.on_epoch(epoch, metrics, checkpoint, is_best)
    return Fitted(int(metrics.get("epoch", first_epoch - 1)), False, metrics)


def _checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Batches,
    epoch: int,
    best: tuple[float, float],
    stopping: EarlyStopping,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Everything the next epoch depends on, taken at the epoch boundary (`_restore` reads it back)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "epoch": epoch,
        "best": list(best),
        "early_stopping": [stopping.lowest, stopping.stale],
        "config": config,
        "rng": rng_state(),
        "loader_generator": loader.generator.get_state(),  # the shuffling order of later epochs
    }


def _restore(
    resume: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, loader: Batches, stopping: EarlyStopping
) -> tuple[tuple[float, float], int]:
    """Continue from checkpoint `resume` (fit made it): the best score so far and the next epoch."""
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    stopping.lowest, stopping.stale = resume.get("early_stopping", (math.inf, 0))  # none before early stopping
    # Last, so nothing above draws from the restored streams.
    loader.generator.set_state(resume["loader_generator"])
    set_rng_state(resume["rng"])
    return tuple(resume["best"]), resume["epoch"] + 1
