"""Ingest: check every image of a source and add the new ones to a dataset, stored by content.

Every file is fully decoded at ingest (core/data/decoding.py), so a bad file is reported here, with
its reason, instead of failing a training run hours later. Stored files are named by the sha256 of
their bytes, so the same image in several datasets is stored once and re-ingesting is idempotent.
Input that cannot be ingested as a whole (one image in two classes, fewer than 2 classes, groups
not covering every image, limits on images and disk) is refused before anything is stored.

The files come from core/data/sources.py (folders, zips) and their specimen groups from
core/data/groups.py (a CSV manifest or a pattern); kept apart so that a new kind of source or of
group is a module beside these, not more lines here.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_dataset_size, check_disk, check_name_length, disk_full_is_user_error
from core.config import Settings
from core.data.decoding import IMAGE_EXTENSIONS, BadImage, check_image
from core.data.groups import compile_group_pattern, groups_from_csv, groups_from_pattern
from core.data.sources import Candidate, dataset_root, scan, source_folder
from core.data.versions import record_version
from core.errors import UserError
from core.progress import ProgressCallback
from core.store.db import Dataset, Image, SkippedFile
from core.store.files import copy_file_atomic, hold_ingest_lock, remove_unless_shared

# Stored extension from the decoded format, so one sha256 always maps to one stored path.
STORED_EXTENSIONS = {"TIFF": ".tif", "PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp"}


@dataclass
class IngestReport:
    dataset_id: int
    name: str
    added: int  # new images stored in this call
    already_present: int  # identical bytes already in the dataset (re-ingest is idempotent)
    duplicates: list[tuple[str, str]]  # (path, path it duplicates) within one class, stored once
    skipped: list[tuple[str, str]]  # (path, reason)
    class_counts: dict[str, int]  # images per class in the dataset after ingest


@dataclass
class _Valid:
    cand: Candidate
    sha256: str
    format: str
    mode: str
    width: int
    height: int


def _validate(cand: Candidate, settings: Settings) -> _Valid:
    if cand.path.stat().st_size == 0:
        raise BadImage("empty file")
    ext = cand.path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise BadImage(f"not an image: unsupported file type '{ext or cand.path.name}'")
    fmt, mode, width, height = check_image(cand.path, settings.max_image_pixels, settings.min_image_side)
    with open(cand.path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return _Valid(cand, sha, fmt, mode, width, height)


def _stored_target(settings: Settings, v: _Valid) -> Path:
    return settings.images_dir / v.sha256[:2] / f"{v.sha256}{STORED_EXTENSIONS[v.format]}"


def _store(settings: Settings, v: _Valid, stored: list[Path]) -> str:
    """Copy the original bytes into the content-addressed store (adding the new file to `stored`);
    returns the path below APP_HOME."""
    target = _stored_target(settings, v)
    if not target.exists():
        copy_file_atomic(v.cand.path, target)
        stored.append(target)
    return target.relative_to(settings.app_home).as_posix()


def ingest(
    session: Session,
    settings: Settings,
    source: Path,
    name: str,
    *,
    groups_csv: Path | None = None,
    group_pattern: str | None = None,
    progress: ProgressCallback | None = None,
    user: User,
    note: str | None = None,
) -> IngestReport:
    """Validate every image under `source` (folder or .zip of class sub-folders) and add the new
    ones to dataset `name`, creating it if needed. `user` must be an editor; a new
    dataset records their name as created_by. When the dataset's images or groups change, they are
    recorded as its next version (core/data/versions.py), by `user` with `note` (else the counts).

    Bad files are skipped with a reason. Input that cannot be ingested as a whole (unsafe zip,
    fewer than 2 classes, one image in two classes, groups not covering every image, more images
    than MAX_IMAGES_PER_DATASET, storage above MAX_DISK_GB, a zip over MAX_UNPACKED_MB or
    MAX_ZIP_ENTRIES, names too long to store) raises UserError before anything is stored; so does a
    full disk, after removing what this call stored. Rows are added and flushed; the caller commits.
    """
    require_editor(user, "add images")
    check_name_length(user.name, "User name")
    name = check_name_length(name.strip(), "Dataset name")
    if not name:
        raise UserError("Give the dataset a name.")
    if groups_csv is not None and group_pattern:
        raise UserError("Give either a groups CSV or a group pattern, not both.")
    group_rx = compile_group_pattern(group_pattern) if group_pattern else None

    source = Path(source).expanduser()
    check_disk(settings)  # before unpacking or decoding anything
    hold_ingest_lock(session, settings)  # until commit: files stored before their rows are visible
    stored: list[Path] = []  # files this call adds to the store
    try:
        with (
            disk_full_is_user_error(settings, f"the images of dataset '{name}'"),
            source_folder(source, settings) as folder,
        ):
            report = _ingest_folder(
                session, settings, folder, source, name, groups_csv, group_rx, progress, user, stored
            )
            dataset = session.get(Dataset, report.dataset_id)
            assert dataset is not None
            record_version(
                session,
                dataset,
                user=user.name,
                note=note or f"ingest: {report.added} added, {report.already_present} already present",
            )
            return report
    except BaseException:
        remove_unless_shared(session, stored)  # their rows will not be committed
        raise


def _ingest_folder(
    session: Session,
    settings: Settings,
    folder: Path,
    source: Path,
    name: str,
    groups_csv: Path | None,
    group_rx: re.Pattern[str] | None,
    progress: ProgressCallback | None,
    user: User,
    stored: list[Path],
) -> IngestReport:
    top = folder.resolve()
    folders, candidates, skipped = scan(dataset_root(folder, top), top)
    for label in folders:
        check_name_length(label, "Class folder name")
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None and len(folders) < 2:
        found = ", ".join(folders) if folders else "none"
        raise UserError(
            f"Found {len(folders)} class folder(s) in {source.name} ({found}); need at least 2. "
            "Expected layout: CLASS/image.tif, one folder per class."
        )

    valid: list[_Valid] = []
    for i, cand in enumerate(candidates, 1):
        try:
            valid.append(_validate(cand, settings))
        except BadImage as e:
            skipped.append((cand.rel, e.reason))
        if progress is not None:
            progress(i, len(candidates))

    unique, duplicates, existing = _deduplicate(session, dataset, name, valid)

    classes = _classes(dataset, name, source, folders, Counter(v.cand.label for v in unique), skipped)

    groups = _groups(groups_csv, group_rx, [v.cand.rel for v in unique])

    new = [v for v in unique if v.sha256 not in existing]
    check_dataset_size(settings, name, len(existing), len(new))
    new_bytes = sum(v.cand.path.stat().st_size for v in new if not _stored_target(settings, v).exists())
    check_disk(settings, new_bytes, f"the {len(new)} new image(s)")

    # All checks passed: from here on, store.
    if dataset is None:
        dataset = Dataset(name=name, classes=classes, source=str(source.resolve()), created_by=user.name)
        session.add(dataset)
        session.flush()

    added, already_present = _add_images(settings, dataset, unique, existing, groups, stored)
    skipped.sort()
    # Duplicates are shown with the skipped files too: they were not taken as separate images.
    dataset.skipped = [SkippedFile(path=p, reason=r) for p, r in skipped] + [
        SkippedFile(path=p, reason=f"duplicate of {other}") for p, other in duplicates
    ]
    session.flush()

    counts = dict(
        session.execute(
            select(Image.label, func.count()).where(Image.dataset_id == dataset.id).group_by(Image.label)
        ).all()
    )
    return IngestReport(
        dataset_id=dataset.id,
        name=name,
        added=added,
        already_present=already_present,
        duplicates=duplicates,
        skipped=skipped,
        class_counts={label: counts.get(label, 0) for label in dataset.classes},
    )


def _deduplicate(
    session: Session, dataset: Dataset | None, name: str, valid: list[_Valid]
) -> tuple[list[_Valid], list[tuple[str, str]], dict[str, Image]]:
    """(unique images, duplicates as (path, path it duplicates), the dataset's images by sha256).

    Identical bytes: stored once within a class; across classes (or against an image already in
    the dataset under another class) the label is ambiguous, and nothing is ingested."""
    first: dict[str, _Valid] = {}
    unique: list[_Valid] = []
    duplicates: list[tuple[str, str]] = []
    conflicts: list[str] = []
    for v in valid:
        seen = first.setdefault(v.sha256, v)
        if seen is v:
            unique.append(v)
        elif seen.cand.label == v.cand.label:
            duplicates.append((v.cand.rel, seen.cand.rel))
        else:
            conflicts.append(f"{seen.cand.rel} and {v.cand.rel}")

    existing: dict[str, Image] = {}
    if dataset is not None:
        existing = {img.sha256: img for img in session.scalars(select(Image).where(Image.dataset_id == dataset.id))}
        for v in unique:
            old = existing.get(v.sha256)
            if old is not None and old.label != v.cand.label:
                conflicts.append(f"{old.original_name} (already in '{name}' as {old.label}) and {v.cand.rel}")
    if conflicts:
        raise UserError(
            f"The same image is in two classes: {'; '.join(conflicts[:5])}. An image can have "
            "only one label: remove the wrong copy and ingest again. Nothing was ingested."
        )
    return unique, duplicates, existing


def _classes(
    dataset: Dataset | None,
    name: str,
    source: Path,
    folders: list[str],
    new_counts: Counter[str],
    skipped: list[tuple[str, str]],
) -> list[str]:
    """The classes of a new dataset: the folders holding a valid image (the others are added to
    `skipped`), at least 2. An existing dataset keeps its classes and takes no new one."""
    if dataset is None:
        classes = sorted(label for label in folders if new_counts[label] > 0)
        for label in folders:
            if new_counts[label] == 0:
                skipped.append((label + "/", "no valid image in this class folder; class left out"))
        if len(classes) < 2:
            raise UserError(
                f"Only {len(classes)} class folder(s) in {source.name} hold a valid image "
                f"({', '.join(classes) or 'none'}); need at least 2. See the skipped files for why."
            )
        return classes
    # Labels are indices into dataset.classes; a new class would shift them under
    # existing splits and runs.
    extra = sorted(label for label in new_counts if label not in dataset.classes)
    if extra:
        raise UserError(
            f"Dataset '{name}' has classes {', '.join(dataset.classes)}; {source.name} adds "
            f"{', '.join(extra)}. Ingest into a new dataset name instead."
        )
    return list(dataset.classes)


def _groups(groups_csv: Path | None, group_rx: re.Pattern[str] | None, rels: list[str]) -> dict[str, str] | None:
    """Each image's group from the CSV or the pattern; None when neither is given."""
    groups: dict[str, str] | None = None
    if groups_csv is not None:
        groups = groups_from_csv(groups_csv, rels)
    elif group_rx is not None:
        groups = groups_from_pattern(group_rx, rels)
    for group in set(groups.values()) if groups else ():
        check_name_length(group, "Group")
    return groups


def _add_images(
    settings: Settings,
    dataset: Dataset,
    unique: list[_Valid],
    existing: dict[str, Image],
    groups: dict[str, str] | None,
    stored: list[Path],
) -> tuple[int, int]:
    """Store the new images and add their rows; update the groups of those already present.
    Returns (added, already present)."""
    added = already_present = 0
    for v in unique:
        group = groups.get(v.cand.rel) if groups is not None else None
        old = existing.get(v.sha256)
        if old is not None:
            already_present += 1
            if groups is not None:
                old.group = group
            continue
        dataset.images.append(
            Image(
                label=v.cand.label,
                sha256=v.sha256,
                stored_path=_store(settings, v, stored),
                original_name=v.cand.rel,
                width=v.width,
                height=v.height,
                mode=v.mode,
                group=group,
            )
        )
        added += 1
    return added, already_present
