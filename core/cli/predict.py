"""Commands that classify: `predict` (images, CSV on stdout), `predict-slide` (a whole slide, tile by
tile) and `predictions` (the log of predictions)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from core.cli.common import cli_user, command
from core.config import Settings
from core.csv_export import write_csv
from core.errors import UserError

DEVICE_HELP = "where the model runs: auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N"


def cmd_predict(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference import service

    images = []
    for path in map(Path, args.images):
        if not path.is_file():
            raise UserError(f"{path}: no such file.")
        images.append(service.ImageInput(str(path), path.read_bytes()))
    # Calibrated where the run has a temperature, as on the pages; probability_kind says which. The
    # columns are a prediction's fields as the API and the log name them (core/inference/service.py).
    results = service.classify(
        Session,
        settings,
        cli_user(args),
        images,
        run_id=args.run,
        source="cli",
        log=args.log,
        calibrated=not args.raw,
        device=args.device,
    )
    rows = [service.prediction_row(r) for r in results]
    header = list(rows[0])
    write_csv(
        sys.stdout,
        header,
        (
            [
                "" if v is None else f"{v:.4f}" if isinstance(v, float) else int(v) if isinstance(v, bool) else v
                for v in map(row.get, header)
            ]
            for row in rows
        ),
    )
    if args.run is None:
        print(f"classified with the approved model: run {results[0].run_id}", file=sys.stderr)


def cmd_predict_slide(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.slides import outputs
    from core.slides.predict import classify_slide

    bar: list[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bar:  # made once tiling has counted the tiles
            bar.append(tqdm(total=total, desc="tiles", unit="tile", file=sys.stderr))
        bar[0].update(done - bar[0].n)

    try:
        pred = classify_slide(
            Session,
            settings,
            cli_user(args),
            args.slide,
            run_id=args.run,
            source="cli",
            log=args.log,
            mpp=args.mpp,
            calibrated=not args.raw,
            device=args.device,
            progress=progress,
        )
    finally:
        for b in bar:
            b.close()
    print("\n".join(outputs.verdict_lines(pred)))
    for path in outputs.write_outputs(pred, Path(args.out), Path(args.slide).stem):
        print(f"wrote {path}")
    if args.run is None:
        print(f"classified with the approved model: run {pred.run_id}", file=sys.stderr)


def _utc_time(text: str | None) -> datetime | None:
    """An ISO date or date and time (UTC unless it names its offset), as the log stores times."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{text!r} is not a date or time; write e.g. 2025-01-31 or 2025-01-31T14:00.") from None
    return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)


def cmd_predictions(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference import prediction_log

    if args.prune:
        with Session.begin() as s:
            print(f"pruned {prediction_log.prune(s, settings)} row(s) older than PREDICTION_LOG_DAYS", file=sys.stderr)
    with Session() as s:
        rows = prediction_log.list_predictions(
            s,
            since=_utc_time(args.since),
            until=_utc_time(args.until),
            run_id=args.run,
            user=args.user,
            predicted=args.predicted,
            limit=args.limit or None,
        )
    if args.csv:
        sys.stdout.write(prediction_log.to_csv(rows))
        return
    print(
        f"{'at (UTC)':<19}  {'user':<14}  {'from':<4}  {'run':>4}  {'predicted':<10}  {'conf.':>6}  {'refer':<5}  image"
    )
    for r in rows:
        refer = "" if r.refer is None else ("yes" if r.refer else "no")
        print(
            f"{r.at:%Y-%m-%d %H:%M:%S}  {r.user[:14]:<14}  {r.source:<4}  {r.run_id:>4}  {r.predicted[:10]:<10}  "
            f"{r.probabilities.get(r.predicted, 0):>6.1%}  {refer:<5}  {r.image_name}"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "predict", cmd_predict, help="classify images with a trained run; CSV on stdout")
    p.add_argument(
        "--run", type=int, default=None, help="the run whose model classifies; without it, the approved model"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--raw",
        action="store_true",
        help="the model's raw probabilities instead of the run's calibrated ones (no refer verdict)",
    )
    p.add_argument("--log", action="store_true", help="record each image's prediction in the log of predictions")
    p.add_argument("--user", help="recorded in the log as who classified; without it, your login name")
    p.add_argument("images", nargs="+", help="image files (TIF, PNG, JPEG, BMP)")

    p = command(
        sub,
        "predict-slide",
        cmd_predict_slide,
        help="classify a whole-slide image tile by tile at the model's own scale; writes the tiles "
        "as CSV and GeoJSON (for QuPath) and a summary",
    )
    p.add_argument(
        "--run", type=int, default=None, help="the run whose model classifies; without it, the approved model"
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="the slide's microns per level-0 pixel, where its file records none or a wrong one",
    )
    p.add_argument("--out", default=".", help="folder for SLIDE.tiles.csv, SLIDE.geojson and SLIDE.summary.json")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--raw",
        action="store_true",
        help="the model's raw probabilities instead of the run's calibrated ones (no refer verdict)",
    )
    p.add_argument("--log", action="store_true", help="record the slide's prediction in the log of predictions")
    p.add_argument("--user", help="recorded in the log as who classified; without it, your login name")
    p.add_argument("slide", help="a whole-slide image (SVS, NDPI, MRXS, SCN, VMS, BIF, CZI, pyramidal TIFF)")

    p = command(sub, "predictions", cmd_predictions, help="the log of predictions, newest first (times in UTC)")
    p.add_argument("--since", help="from this date or time on, e.g. 2025-01-31 or 2025-01-31T14:00")
    p.add_argument("--until", help="before this date or time")
    p.add_argument("--run", type=int, help="only this run's predictions")
    p.add_argument("--user", help="only this user's")
    p.add_argument("--predicted", help="only those predicted as this class")
    p.add_argument("--limit", type=int, default=1000, help="at most this many rows (0: all)")
    p.add_argument("--csv", action="store_true", help="CSV with every field and each class's probability")
    p.add_argument("--prune", action="store_true", help="first delete the rows older than PREDICTION_LOG_DAYS")
