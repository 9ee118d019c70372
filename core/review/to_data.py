"""Reviewed cases become data: their images added to a dataset as its next version.

A case is ready when every review of it names the same class (core/review/store.py) and its image is
kept (core/review/queue.py kept_image). Its image goes through the ordinary ingest (core/data/ingest.py:
checked, stored once by content, the new contents recorded as the next dataset version by
core/data/versions.py) under its reviewed class. In a dataset with specimen groups, each case is
its own group, named by the image's sha256, so that it stays on one side of any split; in a dataset
without groups every image is a unit of its own already, and giving these a group would leave the
others without one.

Images the dataset holds already (by content) are left as they are: ingest would otherwise change
their group, or refuse the whole batch where the reviewed class differs from theirs (a relabel is
core/data/versions.py's).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_text
from core.config import Settings
from core.csv_export import write_csv
from core.data import versions
from core.data.datasets import get_dataset
from core.data.ingest import STORED_EXTENSIONS, ingest
from core.errors import UserError
from core.review.queue import kept_image
from core.review.store import Case, cases
from core.store.db import Image


@dataclass(frozen=True)
class ReadyCase:
    """A reviewed case with one true class."""

    log_id: int
    run_id: int
    image_sha256: str
    true_class: str
    image_path: Path | None  # None: its image was not kept, so it cannot become data


@dataclass(frozen=True)
class AddedCases:
    """What adding reviewed cases to a dataset did."""

    dataset: str
    version: int  # the dataset's new version
    added: tuple[str, ...]  # the sha256 of each image added
    already_present: int  # images the dataset held already, left as they were
    without_image: int  # cases whose image was not kept
    skipped: tuple[tuple[str, str], ...]  # (file, why) refused by ingest


def ready_cases(session: Session, settings: Settings, *, run_id: int | None = None) -> list[ReadyCase]:
    """The reviewed cases with one true class (of run `run_id`; None: every run), by log id."""
    return [
        ReadyCase(c.log_id, c.run_id, c.image_sha256, c.true_class, kept_image(settings, c.image_sha256))
        for c in cases(session, run_id=run_id)
        if c.true_class is not None
    ]


def add_reviewed_cases(
    session: Session,
    settings: Settings,
    user: User,
    dataset: str,
    log_ids: Sequence[int],
    note: str = "",
) -> AddedCases:
    """Add the images of the reviewed cases `log_ids` to `dataset` under their reviewed classes, as
    the dataset's next version by `user` (an editor) with `note`. UserError (nothing changed) when a
    case has no single true class, a class is not the dataset's, or no image is left to add."""
    require_editor(user, "add reviewed images to a dataset")
    note = check_text(note, "Note")
    found = get_dataset(session, dataset)
    chosen = cases(session, log_ids=log_ids)
    unsettled = [c.log_id for c in chosen if c.true_class is None]
    if unsettled or len(chosen) != len(set(log_ids)):
        raise UserError(
            "Only reviewed predictions whose reviewers all name one class become data; "
            f"{len(set(log_ids)) - len(chosen) + len(unsettled)} of those chosen do not."
        )
    foreign = sorted({c.true_class for c in chosen} - set(found.classes))
    if foreign:
        raise UserError(f"Dataset '{dataset}' has classes {', '.join(found.classes)}, not {', '.join(foreign)}.")
    present = set(session.scalars(select(Image.sha256).where(Image.dataset_id == found.id)))
    grouped = session.scalar(select(Image.id).where(Image.dataset_id == found.id, Image.group.is_not(None)).limit(1))
    by_image = _one_class_per_image([c for c in chosen if c.image_sha256 not in present])
    kept = {sha: kept_image(settings, sha) for sha in by_image}
    todo = {sha: c for sha, c in by_image.items() if kept[sha] is not None}
    if not todo:
        raise UserError("No image is left to add: each is in the dataset already, or was not kept for review.")
    before = versions.latest(session, found.id)
    report = _ingest_cases(session, settings, user, dataset, todo, kept, grouped is not None, note)
    after = versions.latest(session, found.id)
    if not report.added or after is None or (before is not None and after.number == before.number):
        reasons = "; ".join(f"{path}: {why}" for path, why in report.skipped[:3])
        raise UserError(f"No reviewed image could be added to '{dataset}'" + (f" ({reasons})." if reasons else "."))
    now = set(session.scalars(select(Image.sha256).where(Image.dataset_id == found.id)))
    return AddedCases(
        dataset,
        after.number,
        tuple(sorted(now & todo.keys())),
        already_present=sum(c.image_sha256 in present for c in chosen),
        without_image=sum(path is None for path in kept.values()),
        skipped=tuple(report.skipped),
    )


def _one_class_per_image(chosen: list[Case]) -> dict[str, Case]:
    """One case per image content; UserError where two cases of one image were given two classes."""
    by_image: dict[str, Case] = {}
    for c in chosen:
        first = by_image.setdefault(c.image_sha256, c)
        if first.true_class != c.true_class:
            raise UserError(
                f"Predictions {first.log_id} and {c.log_id} are of one image, reviewed as {first.true_class} "
                f"and {c.true_class}; leave one out."
            )
    return by_image


def _ingest_cases(
    session: Session,
    settings: Settings,
    user: User,
    dataset: str,
    todo: dict[str, Case],
    kept: dict[str, Path | None],
    grouped: bool,
    note: str,
):
    """Lay the images out as class folders in a scratch folder and ingest them; the IngestReport."""
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="reviewed-", dir=settings.tmp_dir))
    try:
        rows = []
        for sha, c in todo.items():
            path = kept[sha]
            assert path is not None
            rel = f"{c.true_class}/reviewed-{c.log_id}-{sha[:12]}{_extension(path)}"
            (scratch / "images" / c.true_class).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, scratch / "images" / rel)
            rows.append((rel, sha))
        groups = None
        if grouped:
            groups = scratch / "groups.csv"
            with groups.open("w", newline="", encoding="utf-8") as f:
                write_csv(f, ("file", "group"), rows)
        words = f"{len(todo)} reviewed prediction(s) added under their reviewed classes"
        return ingest(
            session,
            settings,
            scratch / "images",
            dataset,
            groups_csv=groups,
            user=user,
            note=f"{words}: {note.strip()}" if note.strip() else words,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _extension(path: Path) -> str:
    """The file extension of the image's format (kept images are named by content alone)."""
    try:
        with PILImage.open(path) as image:
            return STORED_EXTENSIONS.get(image.format or "", ".png")
    except OSError:
        return ".png"  # ingest's own check then says what is wrong with it
