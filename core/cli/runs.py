"""Commands over runs: `train` (here, or queued), `train-distributed`, the background `worker` and its
children, `cancel`, `status`, `resume`, `workers` and `runs` (the list)."""

from __future__ import annotations

import argparse
import sys

from core.cli.common import cli_user, command
from core.config import Settings
from core.errors import UserError
from core.jobs import foreground
from core.training import run_config
from core.training.run_config import RunConfig


def config_from_args(args: argparse.Namespace, settings: Settings) -> RunConfig:
    """The run's settings from the flags; `--dataset NAME@N` names version N of dataset NAME."""
    from core.data.versions import split_reference

    name, number = split_reference(args.dataset)
    if number is not None and args.dataset_version not in (None, number):
        raise UserError(
            f"--dataset {args.dataset} names version {number} and --dataset-version "
            f"{args.dataset_version} another: give the version once."
        )
    return run_config.from_flags(
        args,
        weights=args.weights or settings.default_weights,
        dataset=name,
        dataset_version=args.dataset_version if number is None else number,
    )


def cmd_train(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs import runs
    from core.training.model import check_weights

    config = config_from_args(args, settings)
    if config.split == "paper-leaky":
        print(
            "WARNING: paper-leaky augments before splitting, so copies of one image are on both sides. "
            "Its accuracy reproduces the paper's number; it does not measure accuracy on new images.",
            file=sys.stderr,
        )
    _check_dataset(Session, config)  # a name or version mistyped is said before torch loads
    check_weights(config.weights)  # fail before anything is recorded
    with Session.begin() as s:
        run_ids = [
            r.id for r in runs.create_runs(s, settings, config, user=cli_user(args), name=args.name, notes=args.notes)
        ]
    if args.background:
        print(f"queued run(s) {', '.join(map(str, run_ids))}", file=sys.stderr)
        _start_worker(args, settings)
    else:
        for run_id in run_ids:
            foreground.train_here(Session, settings, run_id)
    print(" ".join(str(i) for i in run_ids))


def _check_dataset(Session, config: RunConfig) -> None:
    """UserError when the config's dataset, or the version it names, does not exist."""
    from core.data import datasets, versions

    with Session() as s:
        dataset = datasets.get_dataset(s, config.dataset)
        if config.dataset_version is not None:
            versions.get_version(s, dataset, config.dataset_version)


def _start_worker(args: argparse.Namespace, settings: Settings) -> None:
    from core.jobs.worker import ensure_worker

    if args.no_worker:
        return
    if ensure_worker(settings):
        print(f"started a background worker (log: {settings.app_home / 'worker.log'})", file=sys.stderr)
    else:
        print("a background worker is running; it takes queued runs in order", file=sys.stderr)


def cmd_train_distributed(args: argparse.Namespace, settings: Settings, Session) -> None:
    """One recorded run trained by every process torchrun started (rank 0 records it); alone, as `train` would."""
    code = foreground.train_distributed(Session, settings, args.run)
    if code is None:  # not rank 0: it records and prints nothing
        return
    print(args.run)
    if code:
        sys.exit(code)


def cmd_worker(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.worker import run_worker

    started = run_worker(settings, once=args.once, max_runs=args.max_runs, slots=args.slots, idle_exit=args.idle_exit)
    print(f"worker stopped after starting {started} run(s)", file=sys.stderr)


def cmd_slide_child(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.children import run_slide_child

    run_slide_child(settings, args.job, parent=args.parent)


def cmd_child(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.children import run_child

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

    if args.background:
        with Session.begin() as s:
            queue.reopen(s, settings, args.run)
        print(f"run {args.run}: queued to resume", file=sys.stderr)
        _start_worker(args, settings)
    else:
        foreground.resume_here(Session, settings, args.run)
    print(args.run)


def cmd_workers(args: argparse.Namespace, settings: Settings, Session) -> None:
    import json

    from core.jobs.worker import worker_status

    with Session() as s:
        print(json.dumps(worker_status(s, settings), indent=2))


def cmd_runs(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs import views

    with Session() as s:
        print(
            f"{'id':>4}  {'status':<9}  {'dataset':<14}  {'split':<11}  {'fold':>4}  {'epochs':>6}  {'test acc':>8}  weights"
        )
        for r in reversed(views.run_rows(s, dataset=args.dataset)):
            acc = r.summary.test_accuracy
            print(
                f"{r.id:>4}  {r.status:<9}  {r.dataset[:14]:<14}  {r.config.split:<11}  {r.fold:>4}  "
                f"{r.epochs_done:>3}/{r.config.epochs:<2}  {'' if acc is None else f'{acc:.4f}':>8}  {r.config.weights}"
            )


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "train",
        cmd_train,
        help="train the paper's model on a dataset (here, or queued with --background); prints the run id(s) last",
        description="Defaults are the paper's settings; the "
        "split is honest (split first, augment only the training part) unless --split paper-leaky.",
    )
    run_config.add_flags(p)
    p.add_argument(
        "--background",
        action="store_true",
        help="queue the run(s) for the background worker and return at once (starts a worker if none is alive)",
    )
    p.add_argument("--no-worker", action="store_true", help="with --background: only queue, start no worker")
    p.add_argument(
        "--user", help="recorded as the runs' creator; MAX_QUEUED_RUNS_PER_USER counts by it (default: your login name)"
    )
    p.add_argument(
        "--name",
        help="your own name for the run(s), shown on the Runs page (default: one made from "
        "the settings that differ from the paper's)",
    )
    p.add_argument("--notes", help="why you ran it, or anything to remember; shown with the run")

    p = command(
        sub,
        "train-distributed",
        cmd_train_distributed,
        help="train a recorded run on several GPUs: torchrun --nproc-per-node=N -m core train-distributed RUN",
        description="Run under torchrun, one process per GPU (nccl; gloo on the CPU): every process "
        "prepares the same data, trains on its share of each batch of the run's batch size, and rank 0 "
        "records the run. Create the run first with `train --background --no-worker`. Prints the run id last.",
    )
    p.add_argument("run", type=int)

    _add_job_commands(sub)

    p = command(sub, "runs", cmd_runs, help="list runs")
    p.add_argument("--dataset", help="only this dataset's runs")


def _add_job_commands(sub: argparse._SubParsersAction) -> None:
    """The background worker and what controls a run's life: cancel, status, resume."""
    p = command(sub, "worker", cmd_worker, help="train queued runs in the background, each in its own process")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty (default: wait for more)")
    p.add_argument("--max-runs", type=int, default=None, help="exit after this many runs (default: no limit)")
    p.add_argument("--slots", type=int, default=None, help="runs trained at once (default: WORKER_SLOTS, else 1)")
    p.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long with no run queued or running (default: never)",
    )

    # Internal: the worker's child process for one run.
    p = command(sub, "_run", cmd_child)
    p.add_argument("run", type=int)
    p.add_argument("--parent", type=int, default=None, help="stop when this process (the worker) is gone")

    # Internal: the worker's child process for one whole slide to classify.
    p = command(sub, "_slide", cmd_slide_child)
    p.add_argument("job", type=int)
    p.add_argument("--parent", type=int, default=None, help="stop when this process (the worker) is gone")

    p = command(
        sub, "cancel", cmd_cancel, help="cancel a queued run, or stop a running one keeping its finished epochs"
    )
    p.add_argument("run", type=int)

    p = command(sub, "status", cmd_status, help="a run's status, progress, latest epoch and heartbeat, as JSON")
    p.add_argument("run", type=int)

    p = command(sub, "resume", cmd_resume, help="continue a failed or cancelled run from its last finished epoch")
    p.add_argument("run", type=int)
    p.add_argument(
        "--background", action="store_true", help="queue it for the background worker instead of training here"
    )
    p.add_argument("--no-worker", action="store_true", help="with --background: only queue, start no worker")

    command(sub, "workers", cmd_workers, help="live background workers and the queue, as JSON")
