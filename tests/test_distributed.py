"""Distributed training (core/training/distributed.py) on the CPU: two gloo processes train like one.

The equivalence test uses a small model with neither BatchNorm nor dropout, the two layers whose
distributed behaviour differs on purpose on the CPU (per-process batch statistics, since PyTorch's
SyncBatchNorm has no CPU kernel; per-process dropout masks). Without them, two processes that each
take half of every global batch and average their gradients must follow the single-process run
step for step, up to float rounding (measured: 1e-7 relative on the losses, 3e-8 on the weights).
The tolerance (1e-4 relative) is far below what a mistake costs: uneven halves averaged without
their weights already move the losses by 7e-4, rank-local metrics or overlapping shards by more.
The paper's DenseNet then goes through the `train-distributed` command end to end, in two processes
given the environment torchrun gives its workers (forked, so that neither imports torch again).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp
from sqlalchemy import select
from torch import nn

from core.__main__ import main
from core.access.accounts import LOCAL_USER
from core.jobs import runs
from core.store.db import EpochMetric, Prediction, Run, RunStatus
from core.training.distributed import Shards, shard_bounds, started
from core.training.loop import Batches, Data, fit
from core.training.run_config import RunConfig
from tests.synthetic import CLASS_COLOURS, ingest_synthetic, synthetic_array

EPOCHS, BATCH, LR, SEED = 3, 7, 3e-3, 5
N_TRAIN = 30  # batches of 7, 7, 7, 7, 2: uneven halves (4 + 3), and a last batch of one image each


def test_shards_partition_every_global_batch():
    for n in range(1, 30):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))  # contiguous, no overlap
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1

    x, y = torch.arange(23).view(23, 1, 1, 1), torch.arange(23)
    for world in (2, 3):
        shards = [Shards(Batches(x, y, 8, shuffle=True, seed=1), r, world) for r in range(world)]
        globals_ = [gy for _, gy in Batches(x, y, 8, shuffle=True, seed=1)]  # 8, 8, 7
        per_rank = [list(s) for s in shards]
        assert all(len(batches) == len(s) == 3 for batches, s in zip(per_rank, shards))  # same number of steps
        for step, gy in enumerate(globals_):
            parts = [per_rank[r][step] for r in range(world)]
            assert torch.equal(torch.cat([py for _, py in parts]), gy)  # the shards rebuild the global batch
            assert all(torch.equal(px.view(-1), py) for px, py in parts)  # images stay with their labels
    # A last global batch smaller than the number of processes (23 = 2 x 11 + 1) is dropped, on every rank.
    tail = [Shards(Batches(x, y, 11, shuffle=False), r, 2) for r in range(2)]
    assert [len(s) for s in tail] == [2, 2]
    assert [[len(py) for _, py in s] for s in tail] == [[6, 6], [5, 5]]  # 22 of 23 images, the lone 23rd dropped


def _data() -> Data:
    labels = [i % 3 for i in range(N_TRAIN)]
    names = list(CLASS_COLOURS)
    x = torch.stack(
        [torch.from_numpy(synthetic_array(names[c], i, (32, 32))).permute(2, 0, 1) for i, c in enumerate(labels)]
    )
    empty = torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    return Data(x, torch.tensor(labels), empty, torch.empty(0, dtype=torch.long))


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


class Keep:
    """Each epoch's metrics and weights, as the Recorder would see them."""

    def __init__(self):
        self.losses, self.accuracies, self.weights = [], [], []

    def on_step(self, epoch, step, steps):
        pass

    def on_epoch(self, epoch, metrics, checkpoint, is_best):
        self.losses.append(metrics["train_loss"])
        self.accuracies.append(metrics["train_accuracy"])
        self.weights.append({k: v.clone() for k, v in checkpoint["model"].items()})

    def should_stop(self):
        return False


def _train(group=None) -> Keep:
    keep = Keep()
    fit(
        _small_model(),
        _data(),
        epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        seed=SEED,
        device=torch.device("cpu"),
        callback=keep,
        config={},
        compile=False,
        group=group,
    )
    return keep


def _as_rank(rank: int, world: int, port: int, work, out: Path) -> None:
    """In a forked child: become process `rank` of `world` as torchrun would make it (its environment
    variables), then run `work(rank)` with stdout and stderr to out/rankN.out and .err. Forked, so
    the child need not import torch again."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    code = 1
    with open(out / f"rank{rank}.out", "w") as stdout, open(out / f"rank{rank}.err", "w") as stderr:
        sys.stdout, sys.stderr = stdout, stderr
        logging.getLogger().handlers.clear()  # pytest's capture handlers belong to the parent
        logging.basicConfig(stream=stderr, level=logging.INFO)
        try:
            code = work(rank) or 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - reported through the exit code and rankN.err
            traceback.print_exc()
        finally:
            stdout.flush()
            stderr.flush()
            os._exit(code)  # not pytest's exit handlers: they belong to the parent


def _run_ranks(work, out: Path, world: int = 2) -> list[int]:
    """Exit codes of `world` forked processes running `work(rank)`; their output goes under `out`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_as_rank, args=(rank, world, port, work, out)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def test_two_gloo_processes_follow_the_single_process_run(tmp_path):
    def work(rank):
        with started("cpu") as group:
            keep = _train(group)
        torch.save(vars(keep), tmp_path / f"rank{rank}.pt")

    assert _run_ranks(work, tmp_path) == [0, 0], (tmp_path / "rank0.err").read_text()[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = _train()
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # The loss curve: rank 0 reports the global batch's figures (both processes' shares together).
    assert len(ranks[0]["losses"]) == EPOCHS
    for both, one in zip(ranks[0]["losses"], alone.losses):
        assert abs(both - one) <= 1e-4 * abs(one), (ranks[0]["losses"], alone.losses)
    assert ranks[0]["accuracies"] == alone.accuracies
    assert alone.losses[-1] < alone.losses[0]  # it did learn, so the comparison means something
    # Every epoch's weights: the same on both ranks, and those of the single process.
    for epoch in range(EPOCHS):
        for name, w in alone.weights[epoch].items():
            torch.testing.assert_close(
                ranks[1]["weights"][epoch][name], ranks[0]["weights"][epoch][name], rtol=0, atol=0
            )
            torch.testing.assert_close(ranks[0]["weights"][epoch][name], w, rtol=1e-4, atol=1e-5)
    moved = sum((alone.weights[-1][k] - w).abs().sum() for k, w in _small_model().state_dict().items())
    assert moved > 1e-2  # the weights did change, far beyond the tolerance


def test_train_distributed_command_trains_the_paper_model_with_rank_0_recording(
    tmp_path, settings, Session, capsys, monkeypatch
):
    """The command as torchrun starts it (RANK, WORLD_SIZE, ... in the environment), two processes."""
    dataset = ingest_synthetic(tmp_path / "src", settings, Session, per_class=5)
    # 64 px: at 32 px DenseNet-201's last block sees 1x1 maps, so on the CPU (BatchNorm per process)
    # each norm there would average 3 values a channel (half a batch of 6), which can give NaN gradients.
    config = RunConfig(
        dataset=dataset,
        image_size=64,
        per_class=4,
        epochs=1,
        batch_size=6,
        lr=1e-3,
        weights="none",
        device="cpu",
        val_fraction=0.25,
    )
    with Session.begin() as s:
        (run,) = runs.create_runs(s, settings, config, user=LOCAL_USER)
        run_id = run.id
    home = {"APP_HOME": str(settings.app_home), "DATABASE_URL": settings.database_url}

    def work(rank):
        os.environ.update(home)
        return main(["train-distributed", str(run_id)])

    codes = _run_ranks(work, tmp_path)
    assert codes == [0, 0], [(tmp_path / f"rank{r}.err").read_text()[-3000:] for r in range(2)]
    assert (tmp_path / "rank0.out").read_text().split() == [str(run_id)]  # the run id, by rank 0 alone
    assert (tmp_path / "rank1.out").read_text() == ""
    with Session() as s:
        run = s.get(Run, run_id)
        assert run.status == RunStatus.succeeded, run.error
        assert run.device.startswith("cpu")
        epochs = s.scalars(select(EpochMetric).where(EpochMetric.run_id == run_id)).all()
        assert [e.epoch for e in epochs] == [1]
        assert all(e.val_accuracy is not None and e.train_loss > 0 for e in epochs)
        predictions = s.scalars(select(Prediction).where(Prediction.run_id == run_id)).all()
        assert len(predictions) == run.summary["n_test"] > 0
        assert run.summary["n_train"] == 3 * 4
    folder = settings.runs_dir / str(run_id)  # rank 0 wrote the model file; the checkpoint went with success
    assert (folder / "model.safetensors").is_file() and not (folder / "last.pt").exists()

    # A run that is not queued is refused before any process meets the others.
    capsys.readouterr()
    for name, value in home.items():
        monkeypatch.setenv(name, value)
    assert main(["train-distributed", str(run_id)]) == 2
    assert "succeeded" in capsys.readouterr().err
