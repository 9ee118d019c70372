"""Shared helpers for the benchmarks: naming the device, timing with proper synchronisation,
and printing a figure next to its baseline from the same run."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(
    baseline: Callable[[], object],
    fast: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    repeat: int = 5,
) -> tuple[float, float]:
    """Median seconds per call of each, the calls alternating: on a shared machine whose speed drifts
    within a minute, timing one after the other would measure the drift as much as the difference."""
    for _ in range(warmup):
        baseline()
        fast()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in ((baseline, times[0]), (fast, times[1])):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def report(title: str, device: torch.device, rows: list[tuple[str, float, float, str]]) -> str:
    """rows: (what, baseline, fast, unit). Ratio is fast/baseline for rates, baseline/fast for times."""
    lines = [
        f"## {title}",
        f"device: {device_name(device)}",
        "",
        "| what | baseline | fast path | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for what, base, fast, unit in rows:
        ratio = fast / base if unit.endswith("/s") else base / fast
        lines.append(f"| {what} | {base:.4g} {unit} | {fast:.4g} {unit} | {ratio:.2f}x |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
