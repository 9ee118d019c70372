"""Training throughput (images/s) of the paper's model at batch 24 and 128.

Baselines: a plain PyTorch loop (eager, NCHW, torch's default Adam, batches collated sample by
sample on the host) in fp32, and on CUDA the same loop under bf16 autocast. Fast path (what core.training.loop.fit uses): training images resident on the
device, one gather per batch, channels_last, bf16 autocast, fused Adam, and torch.compile with
CUDA graphs ("reduce-overhead"); on the CPU only the layout and batching differ.
The same steps run through each, on random data of the training size.

    python -m bench.train_throughput                       # GPU: batches 24 and 128
    python -m bench.train_throughput --device cpu --image-size 64 --batches 8 --steps 3   # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.common import device_name, report, sync
from core.training.loop import (
    NullCallback,
    make_loader,
    make_optimizer,
    pick_device,
    prepare_model,
    preprocess,
    train_one_epoch,
)
from core.training.model import PaperDenseNet


def plain_rate(
    x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, device: torch.device, *, bf16: bool = False
) -> float:
    model = PaperDenseNet(3).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    criterion = nn.CrossEntropyLoss()

    def run(n: int) -> None:
        for i, (xb, yb) in enumerate(loader):
            if i == n:
                break
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(model(preprocess(xb, device)), yb.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    run(2)  # warm-up (cudnn autotune, allocator)
    sync(device)
    t0 = time.perf_counter()
    run(steps)
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def fast_rate(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    model = prepare_model(PaperDenseNet(3).to(device), device, compile=True)
    optimizer = make_optimizer(model, 1e-4, device)
    n = steps * batch
    warm = make_loader(x[: 3 * batch], y[: 3 * batch], batch, shuffle=True, seed=0, device=device)
    t0 = time.perf_counter()
    train_one_epoch(model, warm, optimizer, device, 0, NullCallback())  # compiles / captures graphs
    warmup_seconds = time.perf_counter() - t0
    loader = make_loader(x[:n], y[:n], batch, shuffle=True, seed=0, device=device)
    sync(device)
    metrics = train_one_epoch(model, loader, optimizer, device, 1, NullCallback())
    return metrics["images_per_second"], warmup_seconds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[24, 128])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = []
    for batch in args.batches:
        n = (args.steps + 3) * batch
        x = torch.randint(0, 255, (n, 3, args.image_size, args.image_size), dtype=torch.uint8)
        y = torch.randint(0, 3, (n,))
        base = plain_rate(x, y, batch, args.steps, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fast, warmup = fast_rate(x, y, batch, args.steps, device)
        memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"batch {batch}: fast-path warm-up (compilation) {warmup:.1f} s{memory}", flush=True)
        rows.append((f"train, batch {batch}, {args.image_size} px, vs eager fp32", base, fast, "img/s"))
        if device.type == "cuda":
            bf16 = plain_rate(x, y, batch, args.steps, device, bf16=True)
            rows.append((f"train, batch {batch}, {args.image_size} px, vs eager bf16", bf16, fast, "img/s"))
    print(f"device: {device_name(device)}")
    return report("Training throughput (baselines: eager NCHW, fp32 and on CUDA bf16)", device, rows)


if __name__ == "__main__":
    main()
