"""Every GPU figure of bench/RESULTS.md in one call, within a time budget, in one table.

    python -m bench.all --device cuda --minutes 8 --data var/bench-data     # on the GPU machine (bench/gpu.sh)
    python -m bench.all --smoke                                             # every part on the CPU, toy sizes

The parts run one after another, the most important and cheapest first: training throughput at
the small batch (24) against eager fp32 and bf16, prediction (one image and a batch, eager torch
against ONNX Runtime: bench/predict.py), the input pipeline, whole-slide prediction (the library's
batches against the one-tile loop: bench/slide.py), training at the large batch (128), and the
paper's protocol end to end (needs --data, a folder per class; bench/pack_data.py makes a compact
copy). Each runs in a process of its own (bench/isolate.py). Its steps, repeats, samples, slide size or epochs
are scaled to its share of what is left of --minutes, and it is stopped at twice that share at
most (less where the parts after it would lose their minimum); time a part leaves unused goes to
the ones after it. A part that fails is reported with its error, one that runs past its limit is
stopped, and one that no longer fits is reported as skipped; the rest go on.

At the end it prints the environment and one table (part, figure, value, baseline, ratio, device)
and writes them to --out (Markdown, with each part's own output) and to a JSON file beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.figures import Figure, number, part_figures, render
from bench.isolate import Outcome, run_isolated

RESERVE_SECONDS = 10.0  # kept back from --minutes for writing the results
SIZING = 0.75  # a part is sized to fill this much of its share: the rest absorbs misjudged compile times


class Skip(Exception):
    """A part that cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Plan:
    device: str
    smoke: bool
    data: Path | None


@dataclass
class Measured:
    """Figures of earlier parts that size later ones (training rates at the small batch, img/s)."""

    eager: float | None = None
    fast: float | None = None


def clamp(value: float, low: int, high: int) -> int:
    return int(max(low, min(high, value)))


def train_args(batch: int, smoke_batch: int) -> Callable[[Plan, float, Measured], list[str]]:
    def build(plan: Plan, seconds: float, measured: Measured) -> list[str]:
        if plan.smoke:
            return ["--device", "cpu", "--image-size", "32", "--batches", str(smoke_batch), "--steps", "2"]
        # ~75 s of compilation and warm-up; per timed step the three loops together (eager fp32,
        # the fast path, eager bf16) take about this long on an H100-class card
        step = 0.15 + 0.006 * batch
        steps = clamp((SIZING * seconds - 75) / step, 10, 100)
        return ["--device", plan.device, "--batches", str(batch), "--steps", str(steps)]

    return build


def predict_args(plan: Plan, seconds: float, measured: Measured) -> list[str]:
    if plan.smoke:
        return ["--device", "cpu", "--image-size", "32", "--batch", "2", "--repeat", "1"]
    # ~45 s for the ONNX export and the first calls; then each repeat times one image on both paths
    return ["--device", plan.device, "--batch", "256", "--repeat", str(clamp((SIZING * seconds - 45) / 0.1, 10, 100))]


def input_args(plan: Plan, seconds: float, measured: Measured) -> list[str]:
    if plan.smoke:
        return ["--images", "2", "--samples", "8", "--workers", "1"]
    return ["--samples", str(clamp((SIZING * seconds - 10) * 60, 200, 1200))]


def slide_args(plan: Plan, seconds: float, measured: Measured) -> list[str]:
    if plan.smoke:
        return ["--device", "cpu", "--tile-px", "32", "--width", "1500", "--height", "1000"]
    # ~90 s for writing the slide and compiling the model at three batch sizes; then each tissue tile
    # costs about 30 ms over both paths (the naive tiling reads every cell, both paths read each tile).
    tiles = clamp((SIZING * seconds - 90) / 0.03, 200, 1500)  # 1500: a 2 GB slide file (uncompressed texture)
    width = int((4.5 * tiles) ** 0.5 * 448)  # a third of a 3:2 slide is tissue, 448 level-0 px a tile
    return ["--device", plan.device, "--width", str(width), "--height", str(width * 2 // 3)]


def paper_size(seconds: float, measured: Measured) -> tuple[int, int]:
    """Images per class and epochs (the paper's: 1200 and 25) that fit both of the protocol's runs
    (eager baseline and fast path) in `seconds`, from the training rates measured before."""
    eager, fast = measured.eager or 150.0, measured.fast or 600.0
    per_image = 1.2 * (1 / eager + 1 / fast)  # one training image through both runs, validation included
    budget = SIZING * seconds - 90  # ingest, decode + augment, compilation, evaluation, model files
    epochs = clamp(budget / (3 * 1200 * per_image), 1, 25)
    return clamp(budget / (3 * epochs * per_image), 30, 1200), epochs


def paper_args(plan: Plan, seconds: float, measured: Measured) -> list[str]:
    if plan.data is None:
        raise Skip("needs --data, a folder with one sub-folder per class")
    if plan.smoke:
        return [
            "--data",
            str(plan.data),
            "--image-size",
            "32",
            "--per-class",
            "3",
            "--epochs",
            "1",
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ]
    per_class, epochs = paper_size(seconds, measured)
    return ["--data", str(plan.data), "--per-class", str(per_class), "--epochs", str(epochs), "--device", plan.device]


@dataclass(frozen=True)
class Part:
    key: str
    title: str
    module: str
    share: float  # of the budget
    min_seconds: float  # not started with less (GPU sizes)
    args: Callable[[Plan, float, Measured], list[str]]
    uses_device: bool = True


PARTS = (
    Part("train-small", "training throughput, small batch", "bench.train_throughput", 0.28, 60, train_args(24, 2)),
    Part("predict", "prediction", "bench.predict", 0.14, 40, predict_args),
    Part("input-pipeline", "input pipeline", "bench.input_pipeline", 0.06, 15, input_args, uses_device=False),
    Part("slide", "whole-slide prediction", "bench.slide", 0.10, 90, slide_args),
    Part("train-large", "training throughput, large batch", "bench.train_throughput", 0.22, 60, train_args(128, 4)),
    Part("paper-protocol", "the paper's protocol end to end", "bench.paper_protocol", 0.30, 90, paper_args),
)


@dataclass
class PartResult:
    key: str
    title: str
    module: str
    status: str  # ok, failed, timed out, skipped
    reason: str = ""
    argv: list[str] = field(default_factory=list)
    limit_seconds: float = 0.0
    seconds: float = 0.0
    text: str = ""
    log: str = ""
    figures: list[Figure] = field(default_factory=list)

    @property
    def command(self) -> str:
        return " ".join(["python", "-m", self.module, *self.argv])


def remember_rates(figures: list[Figure], measured: Measured) -> None:
    for f in figures:
        if "vs eager fp32" in f.figure and number(f.baseline) and number(f.value):
            measured.eager, measured.fast = number(f.baseline), number(f.value)
            return


def compile_warnings(result: PartResult) -> list[Figure]:
    """A fast path that fell back to eager would pass for a slow fast path: say so beside its figures."""
    return [
        Figure(result.title, "warning", line.strip())
        for line in result.log.splitlines()
        if "torch.compile failed" in line
    ]


def finish(result: PartResult, outcome: Outcome, device: str) -> PartResult:
    result.seconds, result.log, result.text = outcome.seconds, outcome.log, outcome.text
    if outcome.status == "ok":
        result.status = "ok"
        result.figures = part_figures(result.title, outcome.text, device) + compile_warnings(result)
    else:
        result.status, result.reason = outcome.status, outcome.error
        word = "skipped" if outcome.status == "timed out" else "failed"
        result.figures = [Figure(result.title, "all of its figures", f"{word}: {outcome.error}")] + compile_warnings(
            result
        )
    return result


def skipped(part: Part, reason: str) -> PartResult:
    return PartResult(
        part.key,
        part.title,
        part.module,
        "skipped",
        reason,
        figures=[Figure(part.title, "all of its figures", f"skipped: {reason}")],
    )


def run_part(
    part: Part, plan: Plan, budget: tuple[float, float], measured: Measured, env: dict[str, str]
) -> PartResult:
    """`budget`: (its share, in seconds, which its sizes are scaled to; the limit it is stopped at)."""
    share, limit = budget
    # (where the environment could not be recorded, the part is tried and speaks for itself)
    if part.uses_device and plan.device.startswith("cuda") and env.get("CUDA available", "True") != "True":
        return skipped(part, f"CUDA is not available on this machine (torch {env.get('torch', '?')} sees no GPU)")
    if limit < (5 if plan.smoke else part.min_seconds):
        return skipped(part, f"the time ran out ({max(limit, 0):.0f} s left for it)")
    try:
        argv = part.args(plan, share, measured)
    except Skip as exc:
        return skipped(part, str(exc))
    result = PartResult(part.key, part.title, part.module, "running", argv=argv, limit_seconds=limit)
    print(f"[bench.all] {part.title}: sized for {share:.0f} s, stopped at {limit:.0f} s: {result.command}", flush=True)
    outcome = run_isolated(part.module, argv, limit, threads=1 if plan.smoke else None)
    result = finish(result, outcome, env.get("device", ""))
    print(f"[bench.all] {part.title}: {result.status} in {result.seconds:.0f} s {result.reason}", flush=True)
    if part.key == "train-small" and result.status == "ok":
        remember_rates(result.figures, measured)
    return result


def part_time(parts: list[Part], i: int, left: float, smoke: bool) -> tuple[float, float]:
    """Part i's share of the `left` seconds and its limit: up to twice its share, as long as the
    parts after it keep their minimum, so that a misjudged compile time costs the less important
    parts after it rather than the figure itself."""
    rest = parts[i + 1 :]
    if not rest:
        return left, left
    share = left * parts[i].share / sum(p.share for p in parts[i:])
    keep = sum(5 if smoke else p.min_seconds for p in rest)
    return share, max(share, min(2 * share, left - keep))


def environment(plan: Plan, deadline: float) -> dict[str, str]:
    device = "cpu" if plan.smoke else plan.device
    limit = min(90.0, max(5.0, deadline - time.monotonic()))
    outcome = run_isolated("bench.environment", ["--device", device], limit, threads=1 if plan.smoke else None)
    if outcome.status != "ok":
        return {"environment": f"not recorded: {outcome.error}"}
    return json.loads(outcome.text)


def run_all(plan: Plan, parts: list[Part], minutes: float) -> tuple[dict[str, str], list[PartResult]]:
    deadline = time.monotonic() + 60 * minutes - RESERVE_SECONDS
    env = environment(plan, deadline)
    measured, results = Measured(), []
    try:
        for i, part in enumerate(parts):
            share_and_limit = part_time(parts, i, deadline - time.monotonic(), plan.smoke)
            results.append(run_part(part, plan, share_and_limit, measured, env))
    except KeyboardInterrupt:
        done = {r.key for r in results}
        results += [skipped(p, "interrupted") for p in parts if p.key not in done]
    return env, results


def smoke_data(root: Path) -> Path:
    """Three classes of small noisy TIFs, each class its own colour, packed to JPEG as for the GPU
    machine (so the smoke run goes through bench/pack_data.py too)."""
    import numpy as np
    from PIL import Image as PILImage

    from bench.pack_data import pack

    rng = np.random.default_rng(0)
    for label, colour in {"CLL": (200, 80, 160), "FL": (90, 60, 200), "MCL": (230, 170, 200)}.items():
        (root / "tif" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(rng.normal(colour, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            PILImage.fromarray(pixels).save(root / "tif" / label / f"{i:03d}.tif")
    packed = pack(root / "tif", root / "jpeg", max_side=48, quality=90)
    print(f"[bench.all] smoke data: {packed.describe()}", flush=True)
    return root / "jpeg"


def not_measured(results: list[PartResult]) -> list[str]:
    """Each part, or figure, with no value, and why (a part can also say itself that it timed nothing)."""
    return [f"{f.part}: {f.value}" for r in results for f in r.figures if f.value.startswith(("skipped:", "failed:"))]


def other_output(result: PartResult, keep: int = 40) -> list[str]:
    """What a part printed besides its table (compile times, peak memory, warnings, a traceback)."""
    table = set(result.text.splitlines())
    lines = [line for line in result.log.splitlines() if line.strip() and line not in table]
    return lines[-keep:]


def part_section(result: PartResult) -> list[str]:
    lines = [f"### {result.title}: {result.status}", ""]
    if result.argv:
        lines += [f"`{result.command}`, {result.seconds:.0f} s of its {result.limit_seconds:.0f} s limit", ""]
    if result.reason:
        lines += [f"{result.status}: {result.reason}", ""]
    if result.text:
        lines += [result.text, ""]
    extra = other_output(result)
    if extra:
        lines += ["Its other output:", "", "```", *extra, "```", ""]
    return lines


def markdown(header: str, env: dict[str, str], results: list[PartResult]) -> str:
    figures = [f for r in results for f in r.figures]
    lines = [
        "# Benchmarks: the GPU figures of bench/RESULTS.md (bench/all.py)",
        "",
        header,
        "",
        "## Environment",
        "",
        "| what | value |",
        "| --- | --- |",
        *(f"| {k} | {' '.join(str(v).replace('|', '/').split())} |" for k, v in env.items()),
        "",
        "## Figures",
        "",
        render(figures),
        "",
    ]
    missing = not_measured(results)
    lines += [
        "Not measured: none" if not missing else "Not measured:",
        "",
        *(f"- {m}" for m in missing),
        "",
        "## Each part",
        "",
    ]
    for result in results:
        lines += part_section(result)
    return "\n".join(lines)


def write_outputs(out: Path, header: str, record: dict, env: dict[str, str], results: list[PartResult]) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(header, env, results))
    record |= {
        "environment": env,
        "figures": [f.as_dict() for r in results for f in r.figures],
        "not measured": not_measured(results),
        "parts": [
            {
                "key": r.key,
                "title": r.title,
                "status": r.status,
                "reason": r.reason,
                "command": r.command,
                "limit_seconds": round(r.limit_seconds, 1),
                "seconds": round(r.seconds, 1),
                "text": r.text,
                "other output": other_output(r),
            }
            for r in results
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    summary = "\n".join(
        [
            "## Environment",
            *(f"{k}: {v}" for k, v in env.items()),
            "",
            "## Figures",
            render([f for r in results for f in r.figures]),
            "",
            *(f"not measured: {m}" for m in not_measured(results)),
            f"written: {out} and {out.with_suffix('.json')}",
        ]
    )
    print(summary, flush=True)
    return summary


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cuda", help="where the GPU parts run (no fallback: without CUDA they are skipped)"
    )
    parser.add_argument("--minutes", type=float, default=8.0, help="the whole call's budget, results written included")
    parser.add_argument("--data", type=Path, help="a folder per class, for the paper's protocol")
    parser.add_argument(
        "--out", type=Path, default=Path("test-artifacts/bench-all.md"), help="Markdown; JSON beside it"
    )
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes")
    parser.add_argument("--only", nargs="+", choices=[p.key for p in PARTS], help="run these parts alone")
    args = parser.parse_args(argv)
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data} is not a folder")
    parts = [p for p in PARTS if not args.only or p.key in args.only]
    started, t0 = datetime.now(UTC), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        if args.data is not None:
            data = args.data.resolve()
        else:
            data = smoke_data(Path(tmp)) if args.smoke else None
        plan = Plan("cpu" if args.smoke else args.device, args.smoke, data)
        env, results = run_all(plan, parts, args.minutes)
    seconds = time.monotonic() - t0
    command = " ".join(["python -m bench.all", *(argv if argv is not None else sys.argv[1:])])
    header = f"{started:%Y-%m-%d %H:%M} UTC, `{command}`: {seconds:.0f} s of a {args.minutes:g}-minute budget" + (
        " (smoke: CPU, toy sizes; not figures to report)" if args.smoke else ""
    )
    record = {
        "started": started.isoformat(timespec="seconds"),
        "command": command,
        "minutes": args.minutes,
        "smoke": args.smoke,
        "device": plan.device,
        "seconds": round(seconds, 1),
    }
    return write_outputs(args.out, header, record, env, results)


if __name__ == "__main__":
    main()
