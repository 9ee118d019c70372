"""`field`: a model's field accuracy, how it did on the predictions people reviewed
(core/review/field.py), as text or JSON: the same figures as the Runs page and the API."""

from __future__ import annotations

import argparse
import json

from core.cli.common import command
from core.config import Settings
from core.store.runs import get_run


def cmd_field(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.review.field import field_accuracy

    with Session() as s:
        get_run(s, args.run)  # an unknown run is an error, not an empty report
        found = field_accuracy(s, args.run)
    if args.json:
        print(json.dumps(found.to_json(), indent=2))
        return
    print(f"Run {found.run_id}, protocol: field (reviewed predictions, not a random draw of them)")
    print(found.summary())
    shares = [f"{found.predictions} prediction(s) logged"]
    if found.referred_share is not None:
        shares.append(f"{found.referred_share:.1%} referred")
    if found.overruled_share is not None:
        shares.append(f"{found.overruled_share:.1%} of class reviews overruled the model")
    print("; ".join(shares) + ".")
    if not found.counted:
        return
    width = max(len(c) for c in found.classes)
    print("\nConfusion matrix (rows: reviewed class, columns: the model's class)")
    print(" " * width + "  " + "  ".join(c.rjust(width) for c in found.classes) + "  recall")
    for name, row, recall in zip(found.classes, found.confusion, found.recall):
        cells = "  ".join(str(v).rjust(width) for v in row)
        print(f"{name.ljust(width)}  {cells}  {'-' if recall is None else f'{recall:.1%}'}")
    print("\nWeek (Monday, UTC)  predictions  referred  counted  right  overruled")
    for w in found.weeks:
        print(
            f"{w.week.isoformat():18}  {w.predictions:11}  {w.referred:8}  {w.counted:7}  {w.right:5}  {w.overruled:9}"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "field",
        cmd_field,
        help="a model's field accuracy: how it did on the predictions people reviewed (the Review page)",
        description="Accuracy with its bootstrap interval over the reviewed predictions whose reviewers agree, "
        "recall per class, the confusion matrix, the shares referred and overruled, week by week, and the "
        "same accuracy over the cases reviewed blind. Reviewers look at referred and unsure predictions first, "
        "so these are not a random draw of what the model sees.",
    )
    p.add_argument("run", type=int)
    p.add_argument("--json", action="store_true", help="print the figures as JSON (as GET /api/v1/models/RUN/field)")
