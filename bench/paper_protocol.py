"""The paper's protocol end to end: ingest -> split -> augment to N per class -> train -> evaluate,
wall time per phase, for the library's fast path and for the same run with compilation off
(the baseline), same seed, same data.

    python -m bench.paper_protocol --data ../shared/data/lymphoma-iicbu2008          # paper settings
    python -m bench.paper_protocol --data DIR --image-size 64 --per-class 20 --epochs 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import device_name
from core.access.accounts import LOCAL_USER
from core.config import load_settings
from core.data.ingest import ingest
from core.jobs import execute, runs
from core.store.db import Run
from core.store.engine import make_sessionmaker
from core.store.records import RunSummary
from core.training.loop import pick_device
from core.training.run_config import RunConfig


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with one sub-folder per class")
    parser.add_argument("--split", default="paper-leaky", help="paper-leaky (the paper's) or holdout")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--per-class", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as home:
        settings = load_settings({"APP_HOME": home})
        Session = make_sessionmaker(settings.database_url)
        t0 = time.perf_counter()
        with Session.begin() as s:
            ingest(s, settings, args.data, "bench", user=LOCAL_USER)
        ingest_seconds = time.perf_counter() - t0
        results = {}
        for label, compile in (("baseline (eager)", False), ("fast path", True)):
            config = RunConfig(
                dataset="bench",
                split=args.split,
                image_size=args.image_size,
                per_class=args.per_class,
                epochs=args.epochs,
                batch_size=args.batch_size,
                weights=args.weights,
                device=args.device,
                compile=compile,
            )
            with Session.begin() as s:
                (run,) = runs.create_runs(s, settings, config, user=LOCAL_USER)
            t0 = time.perf_counter()
            execute.execute_run(Session, settings, run.id)
            total = time.perf_counter() - t0
            with Session() as s:
                run = s.get(Run, run.id)
                summary = RunSummary.from_dict(run.summary)
                results[label] = (total, dict(run.timings), summary.test_accuracy, summary.images_per_second)

    lines = [
        f"## Paper protocol end to end ({args.split}, {args.image_size} px, {args.per_class}/class, {args.epochs} epochs, batch {args.batch_size})",
        f"device: {device_name(pick_device(args.device))}; ingest {ingest_seconds:.1f} s (once)",
        "",
        "| path | decode + augment | train | evaluate | total | train img/s | test accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, (total, t, acc, ips) in results.items():
        lines.append(
            f"| {label} | {t.get('data_and_augment', 0):.1f} s | {t.get('train', 0):.1f} s | {t.get('evaluate', 0):.1f} s "
            f"| {total:.1f} s | {ips} | {acc:.4f} |"
        )
    base, fast = results["baseline (eager)"][0], results["fast path"][0]
    lines.append(f"\nspeed-up (total): {base / fast:.2f}x")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
