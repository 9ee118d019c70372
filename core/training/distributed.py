"""One run trained by several processes (one per GPU) with torch.distributed and DDP.

Launched by torchrun, which starts the processes and gives each its RANK, LOCAL_RANK and
WORLD_SIZE (`torchrun --nproc-per-node=N -m core train-distributed RUN`). Every process prepares
the same data from the same seed (checked: a process whose data differ stops the run) and walks
the same shuffled order of global batches, `RunConfig.batch_size` images each; each process trains
on its own contiguous slice of every global batch, and DDP averages the gradients, so one step
equals one single-process step on the whole batch. Rank 0 alone has side effects (database,
checkpoints, evaluation); the others train and keep quiet.

Differences from one process, all deliberate:
- BatchNorm. On CUDA the model's BatchNorm layers become SyncBatchNorm, so batch statistics are
  those of the whole global batch, as in one process. PyTorch's SyncBatchNorm has no CPU kernel,
  so on the CPU (gloo) each process normalises with its own slice's statistics, and the running
  statistics are rank 0's (DDP copies rank 0's buffers to the others before every forward). Close
  to the single-process model, not equal; the CPU path exists to test the machinery, not for
  speed.
- Dropout masks come from a per-process, per-epoch seed, so two processes never apply the same
  mask to different images; the run is still reproducible from its seed and number of processes
  (and resumable at an epoch boundary), but its dropout draws differ from a single-process run's.
- An epoch's last global batch is dropped when it has fewer images than there are processes (at
  most N-1 images an epoch, shuffled differently each epoch), since each process needs at least one.
- No torch.compile: DDP trains the eager model (channels_last and bf16 still apply on CUDA).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.errors import UserError

if TYPE_CHECKING:
    from core.training.loop import Batches, Callback, Data

log = logging.getLogger(__name__)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """This rank's [start, stop) of a global batch of `n`: contiguous slices whose sizes differ by at
    most one (the first n % world_size ranks take one more) and which together cover the batch once."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class Shards:
    """This rank's slices of the global batches of `batches` (same order on every rank, since every
    rank's shuffling generator has the same seed and state).

    `weight` is what the current slice's mean loss is multiplied by before backward, so that DDP's
    mean over ranks of the gradients is the gradient of the global batch's mean loss even when the
    slices differ in size: n_rank * world_size / n_global.
    """

    def __init__(self, batches: Batches, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.weight = 1.0

    @property
    def generator(self) -> torch.Generator:
        return self.batches.generator  # the checkpoint keeps its state: the shuffling of later epochs

    def __len__(self) -> int:
        n, size = len(self.batches.y), self.batches.batch_size
        return n // size + (n % size >= self.world_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.batches:
            if len(y) < self.world_size:  # only an epoch's last batch can be this small
                break
            start, stop = shard_bounds(len(y), self.rank, self.world_size)
            self.weight = (stop - start) * self.world_size / len(y)
            yield x[start:stop], y[start:stop]


class AgreedStop:
    """A callback wrapper: rank 0's callback decides whether to stop (cancel, takeover) and every rank
    gets its answer, so all stop after the same step; a rank leaving early would leave the others
    waiting in the next all-reduce."""

    def __init__(self, callback: Callback, group: Group):
        self.callback, self.group = callback, group

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        self.callback.on_step(epoch, step, steps)

    def on_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: dict[str, Any], is_best: bool) -> None:
        self.callback.on_epoch(epoch, metrics, checkpoint, is_best)

    def should_stop(self) -> bool:
        return bool(self.group.broadcast(self.callback.should_stop() if self.group.is_main else None))


@dataclass
class Group:
    """This process's place in a distributed run."""

    rank: int
    world_size: int
    device: torch.device
    control: Any = None  # a gloo group for small Python objects (stop flags); None: the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others pass anything, e.g. None). Goes through gloo on
        the host, so a per-step flag never waits for the GPU."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def check_same_data(self, data: Data) -> None:
        """Stop the run when ranks prepared different training or validation data (a checksum each)."""

        def crc(t: torch.Tensor) -> int:
            return zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes())

        mine = [len(data.y_train), crc(data.x_train), crc(data.y_train), crc(data.x_val), crc(data.y_val)]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, mine, group=self.control)
        if any(other != every[0] for other in every):
            raise RuntimeError(
                f"The processes of this run prepared different data (per rank: {every}); "
                "data preparation must be deterministic for distributed training."
            )

    def sync_batch_norm(self, model: nn.Module) -> nn.Module:
        """SyncBatchNorm on CUDA (in place: the parameters stay the same objects); no change on the
        CPU, which has no SyncBatchNorm kernel (see the module docstring)."""
        if self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, net: nn.Module) -> nn.Module:
        """DDP around `net`; it starts from rank 0's parameters and buffers."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids, output_device=ids[0] if ids else None)

    def shard(self, batches: Batches) -> Shards:
        if batches.batch_size < self.world_size:
            raise UserError(
                f"A batch of {batches.batch_size} cannot be shared by {self.world_size} processes; "
                "use a batch size of at least the number of processes."
            )
        return Shards(batches, self.rank, self.world_size)

    def agreed(self, callback: Callback) -> AgreedStop:
        return AgreedStop(callback, self)

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Torch's global generator (dropout) from (seed, epoch, rank): different masks on each rank."""
        torch.manual_seed(hash((seed, epoch, self.rank)) % 2**63)  # ints hash to themselves: stable across runs

    def sum(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The epoch's training figures summed over ranks: the global batch's, not this rank's share."""
        totals = torch.stack(
            [
                loss_sum.double(),
                correct.double(),
                torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device),
            ]
        )
        dist.all_reduce(totals)
        return totals[0], totals[1].round().long(), int(totals[2].item())


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def started(device_name: str = "auto") -> Iterator[Group | None]:
    """The process group for this process when torchrun started several (None when it is the only
    one: then nothing distributed happens). nccl on CUDA, one GPU per process (cuda:LOCAL_RANK);
    gloo on the CPU. `device_name` is the run's device setting: "cpu" keeps a run on the CPU."""
    if not _launched():
        yield None
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"Process {local_rank} of this machine has no GPU of its own "
                f"({torch.cuda.device_count()} visible); start at most that many per node."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        control = dist.new_group(backend="gloo")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        control = None
    log.info("process %d of %d on %s", rank, world_size, device)
    try:
        yield Group(rank, world_size, device, control)
    finally:
        dist.destroy_process_group()
