"""Commands over a run's results: `evaluate` (Table I, calibration, yardstick, the k-fold summary),
`export` (ONNX), `reproduce-paper`, and the approved model of each class set: `approve`, `withdraw`,
`approvals`."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.cli.common import cli_user, command
from core.cli.reproduce import add_cli as add_reproduce_paper
from core.config import Settings
from core.store.records import RunSummary
from core.store.runs import fold_siblings, get_run


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
            print(
                f"K-fold experiment: {len(done)} of {len(siblings)} folds finished (runs {', '.join(str(r.id) for r in siblings)})"
            )
            from core.jobs.views import fold_spread_words

            reports = [metrics.run_report(s, r) for r in done]
            print(metrics.format_fold_summary(metrics.summarise_folds(reports)))
            spread = fold_spread_words(reports)
            if spread:
                print(spread)
            across = yardstick.describe_folds([RunSummary.from_dict(r.summary).colour_yardstick for r in done])
            if across:
                print(across)


def cmd_export(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference.onnx_export import export_run

    with Session() as s:
        path = export_run(s, settings, args.run, None if args.out is None else Path(args.out))
    print(path)


def cmd_approve(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.jobs.comparisons import approve_checked

    with Session.begin() as s:
        record = approve_checked(s, settings, args.run, cli_user(args), args.note, despite=args.despite)
    print(
        f"run {record.run_id}: approved for {', '.join(record.classes)} by {record.approved_by} "
        f"(model {record.model_sha256[:12]})"
    )


def cmd_withdraw(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference.approval import withdraw

    with Session.begin() as s:
        record = withdraw(s, args.run, cli_user(args))
    print(f"run {args.run}: approval withdrawn; {', '.join(record.classes)} has no approved model now")


def cmd_approvals(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.inference.approval import approval_history

    with Session() as s:
        history = approval_history(s)
    print(
        f"{'id':>4}  {'state':<9}  {'classes':<20}  {'run':<24}  {'approved by':<14}  {'approved at (UTC)':<19}  "
        f"{'ended by':<14}  {'model':<12}  note"
    )
    for a in history:
        run = a.run_label if a.run_id is not None else f"{a.run_label} (deleted)"
        print(
            f"{a.id:>4}  {a.state:<9}  {', '.join(a.classes)[:20]:<20}  {run[:24]:<24}  {a.approved_by[:14]:<14}  "
            f"{a.approved_at:%Y-%m-%d %H:%M:%S}  {(a.withdrawn_by or '')[:14]:<14}  {a.model_sha256[:12]}  {a.note}"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub, "evaluate", cmd_evaluate, help="print a run's per-class table (the paper's Table I) and confusion matrix"
    )
    p.add_argument("run", type=int)

    p = command(
        sub,
        "export",
        cmd_export,
        help="write a trained run's model as an ONNX file for use outside the app; prints its path",
        description="The graph takes the evaluation pipeline's uint8 samples and gives raw class "
        "probabilities; its metadata holds the classes, the preparation (size, tiles, stain parameters) "
        "and the calibration. The README's 'Using a model outside the app' shows how to run it.",
    )
    p.add_argument("run", type=int)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the file format (ONNX, for ONNX Runtime)")
    p.add_argument(
        "--out", help="folder to write run-RUN.onnx into (default: the run's own folder, runs/RUN/model.onnx)"
    )

    add_reproduce_paper(sub)
    _add_approval_commands(sub)


def _add_approval_commands(sub: argparse._SubParsersAction) -> None:
    """The approved model of each class set."""
    p = command(
        sub,
        "approve",
        cmd_approve,
        help="approve a succeeded run's model for its class set (replacing the previous approval)",
    )
    p.add_argument("run", type=int)
    p.add_argument("--note", required=True, help="why this model, e.g. what it was checked against")
    p.add_argument("--user", help="recorded as the approver (default: your login name)")
    p.add_argument(
        "--despite",
        action="store_true",
        help="approve although the run refers every prediction, may be no better than colour alone or "
        "chance, or was tested under the leaky protocol (without it, such a run is refused, saying why)",
    )

    p = command(
        sub,
        "withdraw",
        cmd_withdraw,
        help="withdraw a run's approval: its class set has no approved model until another is approved",
    )
    p.add_argument("run", type=int)
    p.add_argument("--user", help="recorded as who withdrew it (default: your login name)")

    command(sub, "approvals", cmd_approvals, help="every approval of a model, newest first")
