"""Command line: python -m core COMMAND ... (python -m core COMMAND --help for each).

A thin front end over the library, like the web pages. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import os
import signal
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from core.access.accounts import EDITOR, User
from core.config import Settings, load_settings
from core.csv_export import write_csv
from core.store.db import make_sessionmaker
from core.store.records import RunSummary
from core.store.runs import fold_siblings, get_run
from core.errors import UserError
from core.access.limits import check_name_length, disk_full_is_user_error
from core.training import run_config
from core.training.run_config import RunConfig

# torch/torchvision take seconds to import; commands import what they need so --help stays quick.


class Bars:
    """tqdm bars keyed by stage name, drawn on stderr so stdout stays parseable."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="it", file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def cli_user(args: argparse.Namespace) -> User:
    """Who the records are by: --user, else the operating-system user. The command line has the
    database at hand, so it acts as an editor whatever the web app's AUTH_MODE."""
    name = getattr(args, "user", None)
    if not name:
        try:
            name = getpass.getuser()
        except (OSError, KeyError):  # no login name and no passwd entry (some containers)
            name = "cli"
    return User(check_name_length(name, "User name"), EDITOR)


def cmd_ingest(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import slide_ingest

    if slide_ingest.is_slide_folder(Path(args.path)):
        return _ingest_slides(args, settings, Session)
    if (args.tile_px, args.tile_mpp, args.max_tiles) != (None, None, None):
        raise UserError(f"--tile-px, --tile-mpp and --max-tiles are for folders of whole-slide images; "
                        f"{Path(args.path).name} holds images.")
    bars = Bars()
    # The commit writes too: a full disk there is reported like one during the ingest.
    with disk_full_is_user_error(settings, f"dataset '{args.name}'"), Session.begin() as s:
        report = slide_ingest.ingest_fields(
            s, settings, Path(args.path), args.name, mpp=args.mpp, groups_csv=args.groups_csv,
            group_pattern=args.group_pattern, progress=lambda d, t: bars("check images", d, t), user=cli_user(args),
        )
    bars.close()
    _print_ingest(report)


def _ingest_slides(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import slide_ingest

    if args.groups_csv or args.group_pattern:
        raise UserError("A slide's tiles are grouped by their slide: --groups-csv and --group-pattern are for images.")
    bars = Bars()
    try:  # the bar ends before an error is printed under it
        with disk_full_is_user_error(settings, f"dataset '{args.name}'"), Session.begin() as s:
            report = slide_ingest.ingest_slides(
                s, settings, Path(args.path), args.name, mpp=args.mpp, tile_px=args.tile_px, tile_mpp=args.tile_mpp,
                max_tiles=args.max_tiles, progress=lambda d, t: bars("tile slides", d, t), user=cli_user(args))
    finally:
        bars.close()
    for rel, _label, kept in report.slides:
        print(f"slide {rel}: {kept} tiles")
    for rel in report.already_present:
        print(f"slide {rel}: already in the dataset")
    for rel, reason in report.skipped:
        print(f"skipped {rel}: {reason}")
    scale = report.scale
    print(f"{len(report.slides)} slide(s) tiled, {report.tiles_kept} tiles of {scale.tile_px} px at "
          f"{scale.mpp:g} microns per pixel (at most {scale.max_tiles or 'all'} per slide)")
    _print_ingest(report.ingest)


def _print_ingest(report) -> None:
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}")
    for path, first in report.duplicates:
        print(f"duplicate {path}: same bytes as {first}, stored once")
    counts = ", ".join(f"{c} {n}" for c, n in report.class_counts.items())
    print(f"dataset {report.name!r}: {report.added} added, {report.already_present} already present, "
          f"{len(report.skipped)} skipped; classes: {counts}")


def cmd_datasets(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import datasets

    with Session() as s:
        for d in datasets.list_datasets(s):
            groups = {im.group for im in d.images if im.group is not None}
            counts = {c: sum(im.label == c for im in d.images) for c in d.classes}
            print(f"{d.name}: {len(d.images)} images {counts}" + (f", {len(groups)} groups" if groups else ""))


def config_from_args(args: argparse.Namespace, settings: Settings) -> RunConfig:
    return run_config.from_flags(args, weights=args.weights or settings.default_weights)


def cmd_train(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs import runs
    from core.training.model import check_weights

    config = config_from_args(args, settings)
    if config.split == "paper-leaky":
        print("WARNING: paper-leaky augments before splitting, so copies of one image are on both sides. "
              "Its accuracy reproduces the paper's number; it does not measure accuracy on new images.",
              file=sys.stderr)
    check_weights(config.weights)  # fail before anything is recorded
    with Session.begin() as s:
        run_ids = [r.id for r in runs.create_runs(s, settings, config, user=cli_user(args), name=args.name,
                                                   notes=args.notes)]
    if args.background:
        print(f"queued run(s) {', '.join(map(str, run_ids))}", file=sys.stderr)
        _start_worker(args, settings)
    else:
        for run_id in run_ids:
            _train_here(Session, settings, run_id)
    print(" ".join(str(i) for i in run_ids))


def _start_worker(args: argparse.Namespace, settings: Settings) -> None:
    from core.jobs.worker import ensure_worker

    if args.no_worker:
        return
    if ensure_worker(settings):
        print(f"started a background worker (log: {settings.app_home / 'worker.log'})", file=sys.stderr)
    else:
        print("a background worker is running; it takes queued runs in order", file=sys.stderr)


def _train_here(Session, settings: Settings, run_id: int, claimed: bool = False, group=None) -> None:
    """Train a run in this process, owning it like a worker would (so no worker takes it too)."""
    from core.jobs import execute, queue

    if not claimed and queue.claim_next(Session, f"cli:{socket.gethostname()}:{os.getpid()}", run_id) is None:
        print(f"run {run_id}: taken by a background worker; not training it here", file=sys.stderr)
        return
    bars = Bars()
    print(f"run {run_id}: training", file=sys.stderr)
    try:
        execute.execute_run(Session, settings, run_id, progress=bars, group=group)
    finally:
        bars.close()
    with Session() as s:
        run = get_run(s, run_id)
        accuracy = RunSummary.from_dict(run.summary).test_accuracy
        print(f"run {run_id}: {run.status.value}, test accuracy {accuracy}", file=sys.stderr)


def _stopped_by_torchrun(signum, frame) -> None:
    # torchrun stops the other processes with SIGTERM when one fails; raising here lets rank 0
    # record the run as failed instead of leaving it "running" until its heartbeat goes stale.
    # Not while an error is already being handled: that handler is recording the failure.
    if sys.exc_info()[1] is None:
        raise RuntimeError("stopped by torchrun: another process of this run ended (see torchrun's output)")


def cmd_train_distributed(args: argparse.Namespace, settings: Settings, Session) -> None:
    """One recorded run trained by every process torchrun started (rank 0 records it); alone, as `train` would."""
    from core.jobs import queue

    with Session() as s:
        run = queue.get_run(s, args.run)
        status, config = run.status.value, RunConfig.from_dict(run.config)
    # Checked before the processes meet, so that none can have claimed the run yet.
    if status != "queued":
        raise UserError(f"Run {args.run} is {status}; only a queued run can be trained here (queue one with "
                        "`train --background --no-worker`, or reopen this one with `resume --background --no-worker`).")
    from core.jobs import execute
    from core.training import distributed

    with distributed.started(config.device) as group:
        if group is not None and not group.is_main:
            execute.execute_run(Session, settings, args.run, group=group)
            return
        if group is not None:
            signal.signal(signal.SIGTERM, _stopped_by_torchrun)
        _train_here(Session, settings, args.run, group=group)
    with Session() as s:
        status = get_run(s, args.run).status.value
    print(args.run)
    if group is not None and status != "succeeded":
        # The other processes may be waiting for this one (it stopped before training); a failed
        # exit makes torchrun end them.
        sys.exit(1)


def cmd_worker(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.worker import run_worker

    started = run_worker(settings, once=args.once, max_runs=args.max_runs, slots=args.slots, idle_exit=args.idle_exit)
    print(f"worker stopped after starting {started} run(s)", file=sys.stderr)


def cmd_slide_child(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.slide_jobs import run_slide_child

    run_slide_child(settings, args.job, parent=args.parent)


def cmd_child(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.worker import run_child

    run_child(settings, args.run, parent=args.parent)


def cmd_cancel(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs import queue

    with Session.begin() as s:
        status = queue.request_cancel(s, args.run)
    if status.value == "cancelled":
        print(f"run {args.run}: cancelled")
    else:
        print(f"run {args.run}: cancel requested; it stops within a few seconds, keeping its finished epochs")


def cmd_status(args: argparse.Namespace, settings: Settings, Session) -> None:
    import json

    from core.jobs import queue

    with Session() as s:
        print(json.dumps(queue.run_status(s, args.run), indent=2))


def cmd_resume(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs import queue

    if not args.background:
        # Import torch before claiming the run, not after: the claim's heartbeat must not go
        # stale while the training code loads, or a worker would take the run over.
        importlib.import_module("core.jobs.execute")

    me = None if args.background else f"cli:{socket.gethostname()}:{os.getpid()}"
    with Session.begin() as s:
        queue.reopen(s, settings, args.run, worker=me)
    if args.background:
        print(f"run {args.run}: queued to resume", file=sys.stderr)
        _start_worker(args, settings)
    else:
        _train_here(Session, settings, args.run, claimed=True)
    print(args.run)


def cmd_workers(args: argparse.Namespace, settings: Settings, Session) -> None:
    import json

    from core.jobs.worker import worker_status

    with Session() as s:
        print(json.dumps(worker_status(s, settings), indent=2))


def cmd_evaluate(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.evaluation import metrics, slides, yardstick

    with Session() as s:
        run = get_run(s, args.run)
        print(f"Run {run.id} on {run.dataset.name!r}, weights: {run.weights_used}, device: {run.device}")
        report = metrics.run_report(s, run)
        print(metrics.format_report(report))
        if slides.has_slides(s, run.dataset_id):  # tiles of slides: the slides' own results too
            print()
            print(slides.format_slide_report(slides.slide_report(s, run)))
        summary = RunSummary.from_dict(run.summary)
        if summary.calibration is not None:
            from core.evaluation.calibration_words import calibration_words

            print(calibration_words(summary.calibration).text())
        colour = yardstick.describe(summary.colour_yardstick)
        if colour:
            print(colour)
        siblings = fold_siblings(s, run)
        if len(siblings) > 1:
            done = [r for r in siblings if r.status.value == "succeeded"]
            print()
            print(f"K-fold experiment: {len(done)} of {len(siblings)} folds finished (runs {', '.join(str(r.id) for r in siblings)})")
            from core.jobs.views import fold_spread_words

            reports = [metrics.run_report(s, r) for r in done]
            print(metrics.format_fold_summary(metrics.summarise_folds(reports)))
            spread = fold_spread_words(reports)
            if spread:
                print(spread)
            across = yardstick.describe_folds([RunSummary.from_dict(r.summary).colour_yardstick for r in done])
            if across:
                print(across)


def cmd_predict(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference import service

    images = []
    for path in map(Path, args.images):
        if not path.is_file():
            raise UserError(f"{path}: no such file.")
        images.append(service.ImageInput(str(path), path.read_bytes()))
    # Calibrated where the run has a temperature, as on the pages; probability_kind says which. The
    # columns are a prediction's fields as the API and the log name them (core/inference/service.py).
    results = service.classify(Session, settings, cli_user(args), images, run_id=args.run, source="cli",
                               log=args.log, calibrated=not args.raw, device=args.device)
    rows = [service.prediction_row(r) for r in results]
    header = list(rows[0])
    write_csv(sys.stdout, header, (["" if v is None else f"{v:.4f}" if isinstance(v, float) else
                                    int(v) if isinstance(v, bool) else v for v in map(row.get, header)]
                                   for row in rows))
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
        pred = classify_slide(Session, settings, cli_user(args), args.slide, run_id=args.run, source="cli",
                              log=args.log, mpp=args.mpp, calibrated=not args.raw, device=args.device,
                              progress=progress)
    finally:
        for b in bar:
            b.close()
    print("\n".join(outputs.verdict_lines(pred)))
    for path in outputs.write_outputs(pred, Path(args.out), Path(args.slide).stem):
        print(f"wrote {path}")
    if args.run is None:
        print(f"classified with the approved model: run {pred.run_id}", file=sys.stderr)


def cmd_approve(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.comparisons import approve_checked

    with Session.begin() as s:
        record = approve_checked(s, settings, args.run, cli_user(args), args.note, despite=args.despite)
    print(f"run {record.run_id}: approved for {', '.join(record.classes)} by {record.approved_by} "
          f"(model {record.model_sha256[:12]})")


def cmd_withdraw(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference.approval import withdraw

    with Session.begin() as s:
        record = withdraw(s, args.run, cli_user(args))
    print(f"run {args.run}: approval withdrawn; {', '.join(record.classes)} has no approved model now")


def cmd_approvals(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference.approval import approval_history

    with Session() as s:
        history = approval_history(s)
    print(f"{'id':>4}  {'state':<9}  {'classes':<20}  {'run':<24}  {'approved by':<14}  {'approved at (UTC)':<19}  "
          f"{'ended by':<14}  {'model':<12}  note")
    for a in history:
        run = a.run_label if a.run_id is not None else f"{a.run_label} (deleted)"
        print(f"{a.id:>4}  {a.state:<9}  {', '.join(a.classes)[:20]:<20}  {run[:24]:<24}  {a.approved_by[:14]:<14}  "
              f"{a.approved_at:%Y-%m-%d %H:%M:%S}  {(a.withdrawn_by or '')[:14]:<14}  {a.model_sha256[:12]}  {a.note}")


def _utc_time(text: str | None) -> datetime | None:
    """An ISO date or date and time (UTC unless it names its offset), as the log stores times."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{text!r} is not a date or time; write e.g. 2025-01-31 or 2025-01-31T14:00.") from None
    return value if value.tzinfo is None else value.astimezone(timezone.utc).replace(tzinfo=None)


def cmd_predictions(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference import prediction_log

    if args.prune:
        with Session.begin() as s:
            print(f"pruned {prediction_log.prune(s, settings)} row(s) older than PREDICTION_LOG_DAYS", file=sys.stderr)
    with Session() as s:
        rows = prediction_log.list_predictions(s, since=_utc_time(args.since), until=_utc_time(args.until),
                                               run_id=args.run, user=args.user, predicted=args.predicted,
                                               limit=args.limit or None)
    if args.csv:
        sys.stdout.write(prediction_log.to_csv(rows))
        return
    print(f"{'at (UTC)':<19}  {'user':<14}  {'from':<4}  {'run':>4}  {'predicted':<10}  {'conf.':>6}  {'refer':<5}  image")
    for r in rows:
        refer = "" if r.refer is None else ("yes" if r.refer else "no")
        print(f"{r.at:%Y-%m-%d %H:%M:%S}  {r.user[:14]:<14}  {r.source:<4}  {r.run_id:>4}  {r.predicted[:10]:<10}  "
              f"{r.probabilities.get(r.predicted, 0):>6.1%}  {refer:<5}  {r.image_name}")


def cmd_export(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference.onnx_export import export_run

    with Session() as s:
        path = export_run(s, settings, args.run, None if args.out is None else Path(args.out))
    print(path)


def cmd_runs(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs import views

    with Session() as s:
        print(f"{'id':>4}  {'status':<9}  {'dataset':<14}  {'split':<11}  {'fold':>4}  {'epochs':>6}  {'test acc':>8}  weights")
        for r in reversed(views.run_rows(s, dataset=args.dataset)):
            acc = r.summary.test_accuracy
            print(f"{r.id:>4}  {r.status:<9}  {r.dataset[:14]:<14}  {r.config.split:<11}  {r.fold:>4}  "
                  f"{r.epochs_done:>3}/{r.config.epochs:<2}  {'' if acc is None else f'{acc:.4f}':>8}  {r.config.weights}")


def cmd_check(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.store import consistency

    run = consistency.fix if args.fix else consistency.check
    report = run(Session, settings, deep=args.deep)
    print(report.format())
    sys.exit(1 if report.remaining else 0)


def cmd_migrate(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.store import migrations
    from core.store.db import new_engine

    engine = new_engine(settings.database_url)
    try:
        done = migrations.upgrade(engine)
    finally:
        engine.dispose()
    print(f"before: {done.said_before()}")
    print(f"after: {done.after}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("ingest", help="add a folder of class sub-folders (or a .zip of one) as a dataset; slides "
                       "are tiled, each tile grouped by its slide", formatter_class=fmt)
    p.add_argument("path", help="folder with one sub-folder per class, of images or of whole-slide images, or a "
                   ".zip of such a folder of images")
    p.add_argument("--name", required=True, help="dataset name; ingesting again into a name adds new images")
    p.add_argument("--groups-csv", type=Path, help="CSV with columns file,group (specimen/patient of each image)")
    p.add_argument("--group-pattern", help=r"regex on the relative path whose group 'group' (or 1) is the specimen id, e.g. '^[^/]+/(\d+)_'")
    p.add_argument("--user", help="recorded as the dataset's creator (default: your login name)")
    p.add_argument("--mpp", type=float, help="microns per pixel of the files: for slides, those whose file records "
                   "none; for images, recorded so a model knows the scale it was trained at")
    p.add_argument("--tile-px", type=int, help="slides: side of each tile in pixels (default: SLIDE_TILE_PX)")
    p.add_argument("--tile-mpp", type=float, help="slides: microns per pixel of the tiles (default: SLIDE_MPP)")
    p.add_argument("--max-tiles", type=int, help="slides: most tiles per slide, 0 for all (default: SLIDE_MAX_TILES)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("datasets", help="list datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("train", help="train the paper's model on a dataset (here, or queued with --background); prints the run id(s) last",
                       formatter_class=fmt, description="Defaults are the paper's settings; the split is honest "
                       "(split first, augment only the training part) unless --split paper-leaky.")
    run_config.add_flags(p)
    p.add_argument("--background", action="store_true",
                   help="queue the run(s) for the background worker and return at once (starts a worker if none is alive)")
    p.add_argument("--no-worker", action="store_true", help="with --background: only queue, start no worker")
    p.add_argument("--user", help="recorded as the runs' creator; MAX_QUEUED_RUNS_PER_USER counts by it (default: your login name)")
    p.add_argument("--name", help="your own name for the run(s), shown on the Runs page (default: one made from "
                   "the settings that differ from the paper's)")
    p.add_argument("--notes", help="why you ran it, or anything to remember; shown with the run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-distributed", help="train a recorded run on several GPUs: torchrun --nproc-per-node=N -m core train-distributed RUN",
                       description="Run under torchrun, one process per GPU (nccl; gloo on the CPU): every process "
                       "prepares the same data, trains on its share of each batch of the run's batch size, and rank 0 "
                       "records the run. Create the run first with `train --background --no-worker`. Prints the run id last.")
    p.add_argument("run", type=int)
    p.set_defaults(func=cmd_train_distributed)

    _add_job_commands(sub)
    _add_result_commands(sub, fmt)
    _add_approval_commands(sub)

    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--dataset", help="only this dataset's runs")
    p.set_defaults(func=cmd_runs)
    return parser


def _add_job_commands(sub) -> None:
    """The background worker and what controls a run's life: cancel, status, resume."""
    p = sub.add_parser("worker", help="train queued runs in the background, each in its own process")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty (default: wait for more)")
    p.add_argument("--max-runs", type=int, default=None, help="exit after this many runs")
    p.add_argument("--slots", type=int, default=None, help="runs trained at once (default: WORKER_SLOTS, else 1)")
    p.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                   help="exit after this long with no run queued or running (default: never)")
    p.set_defaults(func=cmd_worker)

    # Internal: the worker's child process for one run.
    p = sub.add_parser("_run")
    p.add_argument("run", type=int)
    p.add_argument("--parent", type=int, default=None, help="stop when this process (the worker) is gone")
    p.set_defaults(func=cmd_child)

    # Internal: the worker's child process for one whole slide to classify.
    p = sub.add_parser("_slide")
    p.add_argument("job", type=int)
    p.add_argument("--parent", type=int, default=None, help="stop when this process (the worker) is gone")
    p.set_defaults(func=cmd_slide_child)

    p = sub.add_parser("cancel", help="cancel a queued run, or stop a running one keeping its finished epochs")
    p.add_argument("run", type=int)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="a run's status, progress, latest epoch and heartbeat, as JSON")
    p.add_argument("run", type=int)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("resume", help="continue a failed or cancelled run from its last finished epoch")
    p.add_argument("run", type=int)
    p.add_argument("--background", action="store_true", help="queue it for the background worker instead of training here")
    p.add_argument("--no-worker", action="store_true", help="with --background: only queue, start no worker")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("workers", help="live background workers and the queue, as JSON")
    p.set_defaults(func=cmd_workers)


def _add_result_commands(sub, fmt) -> None:
    """What reads a run's results: evaluate, predict, the paper reproduction, the consistency check."""
    p = sub.add_parser("evaluate", help="print a run's per-class table (the paper's Table I) and confusion matrix")
    p.add_argument("run", type=int)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify images with a trained run; CSV on stdout", formatter_class=fmt)
    p.add_argument("--run", type=int, default=None, help="the run whose model classifies; without it, the approved model")
    p.add_argument("--device", default="auto")
    p.add_argument("--raw", action="store_true",
                   help="the model's raw probabilities instead of the run's calibrated ones (no refer verdict)")
    p.add_argument("--log", action="store_true", help="record each image's prediction in the log of predictions")
    p.add_argument("--user", help="recorded in the log as who classified; without it, your login name")
    p.add_argument("images", nargs="+", help="image files (TIF, PNG, JPEG, BMP)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("predict-slide", formatter_class=fmt,
                       help="classify a whole-slide image tile by tile at the model's own scale; writes the tiles "
                       "as CSV and GeoJSON (for QuPath) and a summary")
    p.add_argument("--run", type=int, default=None, help="the run whose model classifies; without it, the approved model")
    p.add_argument("--mpp", type=float, default=None,
                   help="the slide's microns per level-0 pixel, where its file records none or a wrong one")
    p.add_argument("--out", default=".", help="folder for SLIDE.tiles.csv, SLIDE.geojson and SLIDE.summary.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--raw", action="store_true",
                   help="the model's raw probabilities instead of the run's calibrated ones (no refer verdict)")
    p.add_argument("--log", action="store_true", help="record the slide's prediction in the log of predictions")
    p.add_argument("--user", help="recorded in the log as who classified; without it, your login name")
    p.add_argument("slide", help="a whole-slide image (SVS, NDPI, MRXS, SCN, VMS, BIF, CZI, pyramidal TIFF)")
    p.set_defaults(func=cmd_predict_slide)

    p = sub.add_parser("export", help="write a trained run's model as an ONNX file for use outside the app; prints its path",
                       description="The graph takes the evaluation pipeline's uint8 samples and gives raw class "
                       "probabilities; its metadata holds the classes, the preparation (size, tiles, stain parameters) "
                       "and the calibration. The README's 'Using a model outside the app' shows how to run it.")
    p.add_argument("run", type=int)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the file format (ONNX, for ONNX Runtime)")
    p.add_argument("--out", help="folder to write run-RUN.onnx into (default: the run's own folder, runs/RUN/model.onnx)")
    p.set_defaults(func=cmd_export)

    from core.jobs.reproduce import add_cli as add_reproduce_paper

    add_reproduce_paper(sub)

    p = sub.add_parser("check", help="compare the database with the files under APP_HOME; exit 1 when they disagree",
                       description="Reports image rows whose file is missing or damaged, finished runs without a "
                       "model file, files under images/ that no row references, leftovers of interrupted writes and "
                       "uploads, and run folders without a run. Exit status 0: clean; 1: problems (after --fix: "
                       "problems left).")
    p.add_argument("--deep", action="store_true", help="also hash every stored image and read every model file (slow)")
    p.add_argument("--fix", action="store_true",
                   help="remove unreferenced files, temporary leftovers and folders of deleted runs (never database rows)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("migrate", help="bring the database's schema to this version's (as every start does); prints "
                       "its revision before and after")
    p.set_defaults(func=cmd_migrate)


def _add_approval_commands(sub) -> None:
    """The approved model of each class set, and the log of predictions."""
    p = sub.add_parser("approve", help="approve a succeeded run's model for its class set (replacing the previous approval)")
    p.add_argument("run", type=int)
    p.add_argument("--note", required=True, help="why this model, e.g. what it was checked against")
    p.add_argument("--user", help="recorded as the approver (default: your login name)")
    p.add_argument("--despite", action="store_true",
                   help="approve although the run refers every prediction, may be no better than colour alone or "
                        "chance, or was tested under the leaky protocol (without it, such a run is refused, saying why)")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("withdraw", help="withdraw a run's approval: its class set has no approved model until another is approved")
    p.add_argument("run", type=int)
    p.add_argument("--user", help="recorded as who withdrew it (default: your login name)")
    p.set_defaults(func=cmd_withdraw)

    p = sub.add_parser("approvals", help="every approval of a model, newest first")
    p.set_defaults(func=cmd_approvals)

    p = sub.add_parser("predictions", help="the log of predictions, newest first (times in UTC)")
    p.add_argument("--since", help="from this date or time on, e.g. 2025-01-31 or 2025-01-31T14:00")
    p.add_argument("--until", help="before this date or time")
    p.add_argument("--run", type=int, help="only this run's predictions")
    p.add_argument("--user", help="only this user's")
    p.add_argument("--predicted", help="only those predicted as this class")
    p.add_argument("--limit", type=int, default=1000, help="at most this many rows (0: all)")
    p.add_argument("--csv", action="store_true", help="CSV with every field and each class's probability")
    p.add_argument("--prune", action="store_true", help="first delete the rows older than PREDICTION_LOG_DAYS")
    p.set_defaults(func=cmd_predictions)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    settings = load_settings()
    try:
        # migrate reports the schema as it found it, before make_engine's upgrade.
        Session = None if args.func is cmd_migrate else make_sessionmaker(settings.database_url)
        args.func(args, settings, Session)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
