"""Dataset versions: each change to a dataset's contents is kept as a new version, never changed after.

A version is a manifest: the images the dataset held, each with its class and specimen group then
(DatasetVersion and DatasetVersionImage in core/store/db.py), numbered 1, 2, 3... per dataset with
who made it, when and why. Images are stored once, by content (core/data/ingest.py): a version names
them and copies no file, so a relabel changes an image's class in the new version only.

The Image rows hold the dataset as it is now, which is its latest version: an ingest that adds
images or changes groups (core/data/ingest.py), a change of groups (core/data/groups.py) and
`relabel` record the next version with `record_version`. A run names the version it trains on (its
RunConfig's dataset_version, the latest when launched without one); its split is made over that
version's images with that version's classes and groups (core/data/splits.py), so it can be trained
again on exactly those images whatever was added since. `diff` compares two versions: the images
added, removed, relabelled and regrouped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_text
from core.config import Settings
from core.data.datasets import get_dataset, lock_dataset
from core.errors import UserError
from core.store.db import Dataset, DatasetVersion, DatasetVersionImage, Image
from core.store.files import hold_ingest_lock

MAX_NOTE = 4000  # characters of a version's note
# The note of a version recorded because the images changed where no version was recorded (rows
# written by other means than this package's callers), found when a run is launched on the latest.
FOUND_CHANGED = "the dataset's images as found when a run was launched (changed without a recorded version)"
_REFERENCE = re.compile(r"(?P<name>.+)@(?P<number>[0-9]+)")


@dataclass(frozen=True)
class VersionImage:
    """An image as a version holds it."""

    image_id: int
    sha256: str
    name: str  # its path inside the source it came from, e.g. "CLL/001.tif"
    label: str  # its class in this version
    group: str | None  # its specimen group in this version


@dataclass(frozen=True)
class VersionSummary:
    """A version as listed: its number, when and by whom, its note and its images per class."""

    number: int
    created_at: datetime
    created_by: str | None  # None: not known (version 1 of a dataset from before versions)
    note: str
    counts: dict[str, int]  # class -> images

    @property
    def images(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class DiffLine:
    """One image that differs between two versions, in words: a line of the diff's table."""

    change: str  # added | removed | relabelled | regrouped
    image: str  # its name inside its source
    label: str  # its class, or "OLD → NEW" when relabelled
    group: str  # its group, or "OLD → NEW" when regrouped; "" when it has none
    sha256: str


@dataclass(frozen=True)
class VersionDiff:
    """What changed from version `old` to version `new` of a dataset, image by image."""

    dataset: str
    old: int
    new: int
    added: tuple[VersionImage, ...]
    removed: tuple[VersionImage, ...]
    relabelled: tuple[tuple[VersionImage, VersionImage], ...]  # (as in old, as in new)
    regrouped: tuple[tuple[VersionImage, VersionImage], ...]  # same class, another group

    def summary(self) -> str:
        """E.g. "version 1 → 2: 6 added, 0 removed, 1 relabelled"."""
        counts = f"{len(self.added)} added, {len(self.removed)} removed, {len(self.relabelled)} relabelled"
        return f"version {self.old} → {self.new}: {counts}" + (
            f", {len(self.regrouped)} regrouped" if self.regrouped else ""
        )

    def lines(self) -> list[DiffLine]:
        """Every image that differs, added first, then removed, relabelled and regrouped, each by name."""

        def group(image: VersionImage) -> str:
            return image.group or ""

        return [
            *(DiffLine("added", im.name, im.label, group(im), im.sha256) for im in self.added),
            *(DiffLine("removed", im.name, im.label, group(im), im.sha256) for im in self.removed),
            *(
                DiffLine("relabelled", new.name, f"{old.label} → {new.label}", group(new), new.sha256)
                for old, new in self.relabelled
            ),
            *(
                DiffLine(
                    "regrouped", new.name, new.label, f"{group(old) or '(none)'} → {group(new) or '(none)'}", new.sha256
                )
                for old, new in self.regrouped
            ),
        ]


def split_reference(text: str) -> tuple[str, int | None]:
    """A dataset as the command line names it: "NAME@3" is version 3 of NAME, "NAME" its latest (None)."""
    found = _REFERENCE.fullmatch(text)
    if found is None:
        return text, None
    return found["name"], int(found["number"])


def _contents(session: Session, dataset_id: int) -> dict[int, tuple[str, str | None]]:
    """The dataset's images now: image id -> (class, group)."""
    rows = session.execute(select(Image.id, Image.label, Image.group).where(Image.dataset_id == dataset_id))
    return {image_id: (label, group) for image_id, label, group in rows}


def _manifest(session: Session, version_id: int) -> dict[int, tuple[str, str | None]]:
    """A version's images: image id -> (class, group)."""
    rows = session.execute(
        select(DatasetVersionImage.image_id, DatasetVersionImage.label, DatasetVersionImage.group).where(
            DatasetVersionImage.version_id == version_id
        )
    )
    return {image_id: (label, group) for image_id, label, group in rows}


def latest(session: Session, dataset_id: int) -> DatasetVersion | None:
    """The dataset's newest version; None when it has none."""
    return session.scalar(
        select(DatasetVersion)
        .where(DatasetVersion.dataset_id == dataset_id)
        .order_by(DatasetVersion.number.desc())
        .limit(1)
    )


def _differs(session: Session, dataset_id: int) -> bool:
    newest = latest(session, dataset_id)
    return newest is None or _manifest(session, newest.id) != _contents(session, dataset_id)


def record_version(session: Session, dataset: Dataset, *, user: str | None, note: str) -> DatasetVersion | None:
    """Record the dataset's images now as its next version, by `user` (a name) with `note`, unless
    they are its latest version's already; returns the new version, or None when nothing changed.

    Where they differ, the dataset is locked until the transaction ends (core/data/datasets.py
    lock_dataset), so that two changes at once get one number after the other. Rows are added and
    flushed; the caller commits.
    """
    if not _differs(session, dataset.id):  # read only: most launches of a run change nothing
        return None
    lock_dataset(session, dataset)
    newest = latest(session, dataset.id)
    now = _contents(session, dataset.id)
    if newest is not None and _manifest(session, newest.id) == now:  # recorded meanwhile
        return None
    counts = Counter(label for label, _ in now.values())
    version = DatasetVersion(
        dataset_id=dataset.id,
        number=1 if newest is None else newest.number + 1,
        created_by=user,
        note=note,
        counts={c: counts.get(c, 0) for c in dataset.classes},
    )
    session.add(version)
    session.flush()
    if now:
        session.execute(
            insert(DatasetVersionImage),
            [
                {"version_id": version.id, "image_id": image_id, "label": label, "group": group}
                for image_id, (label, group) in now.items()
            ],
        )
    return version


def get_version(session: Session, dataset: Dataset, number: int) -> DatasetVersion:
    """Version `number` of `dataset`; UserError naming the versions it has when there is none."""
    found = session.scalar(
        select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id, DatasetVersion.number == number)
    )
    if found is None:
        newest = latest(session, dataset.id)
        have = f"its versions are 1 to {newest.number}" if newest is not None else "it has no version yet"
        raise UserError(f"Dataset '{dataset.name}' has no version {number}; {have}.")
    return found


def resolve(session: Session, dataset: Dataset, number: int | None) -> DatasetVersion:
    """Version `number` of `dataset`, or with None its latest: the images as they are now, recorded
    first as a new version if they changed without one (or the dataset has none yet)."""
    if number is not None:
        return get_version(session, dataset, number)
    made = record_version(session, dataset, user=None, note=FOUND_CHANGED)
    if made is not None:
        return made
    newest = latest(session, dataset.id)
    assert newest is not None  # record_version made one where there was none
    return newest


def version_images(session: Session, version: DatasetVersion) -> list[VersionImage]:
    """The images of `version`, by image id (the order splits are made in)."""
    rows = session.execute(
        select(
            DatasetVersionImage.image_id,
            Image.sha256,
            Image.original_name,
            DatasetVersionImage.label,
            DatasetVersionImage.group,
        )
        .join(Image, Image.id == DatasetVersionImage.image_id)
        .where(DatasetVersionImage.version_id == version.id)
        .order_by(DatasetVersionImage.image_id)
    )
    return [VersionImage(*row) for row in rows]


def classes_and_groups(session: Session, dataset_id: int, number: int) -> dict[int, tuple[str, str | None]]:
    """Each image of version `number` of the dataset: image id -> (class, group) in that version."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise UserError(f"Dataset {dataset_id} was deleted.")
    return _manifest(session, get_version(session, dataset, number).id)


def version_list(session: Session, name: str) -> list[VersionSummary]:
    """The versions of dataset `name`, newest first."""
    dataset = get_dataset(session, name)
    rows = session.scalars(
        select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id).order_by(DatasetVersion.number.desc())
    )
    return [VersionSummary(v.number, v.created_at, v.created_by, v.note, dict(v.counts)) for v in rows]


def diff(session: Session, name: str, old: int, new: int) -> VersionDiff:
    """What changed from version `old` to version `new` of dataset `name` (either may be the later)."""
    dataset = get_dataset(session, name)
    before = {im.image_id: im for im in version_images(session, get_version(session, dataset, old))}
    after = {im.image_id: im for im in version_images(session, get_version(session, dataset, new))}
    both = [(before[i], after[i]) for i in sorted(before.keys() & after.keys())]

    def by_name(images: list[VersionImage]) -> tuple[VersionImage, ...]:
        return tuple(sorted(images, key=lambda im: (im.name, im.image_id)))

    return VersionDiff(
        name,
        old,
        new,
        added=by_name([after[i] for i in after.keys() - before.keys()]),
        removed=by_name([before[i] for i in before.keys() - after.keys()]),
        relabelled=tuple(sorted(((a, b) for a, b in both if a.label != b.label), key=lambda p: p[1].name)),
        regrouped=tuple(
            sorted(((a, b) for a, b in both if a.label == b.label and a.group != b.group), key=lambda p: p[1].name)
        ),
    )


def relabel(
    session: Session,
    settings: Settings,
    dataset: str,
    changes: Mapping[str, str],
    user: User,
    note: str = "",
) -> DatasetVersion:
    """Give images of dataset `dataset` new classes ({image sha256: class}) as its next version, with
    `note` (else one saying how many moved). Earlier versions keep the classes they had: runs trained
    on them, and runs launched on them again, see the images as they were. No file is copied. `user`
    (when given) must be an editor and is recorded as the version's author.

    Raises:
        UserError: no such dataset, an image not in it, a class it does not have, nothing that
            would change, or a note too long; nothing is changed then.
    """
    require_editor(user, "relabel images")
    note = check_text(note.strip(), "Note")
    if len(note) > MAX_NOTE:
        raise UserError(f"A version's note is limited to {MAX_NOTE} characters; this one has {len(note)}.")
    if not changes:
        raise UserError("Name at least one image to relabel.")
    hold_ingest_lock(session, settings)  # before the dataset's lock, in the order a delete takes them
    found = lock_dataset(session, get_dataset(session, dataset))
    foreign = sorted({label for label in changes.values() if label not in found.classes})
    if foreign:
        raise UserError(
            f"Dataset '{dataset}' has classes {', '.join(found.classes)}; {', '.join(foreign)} is not "
            "one of them. A relabel moves images between a dataset's classes."
        )
    images = {im.sha256: im for im in session.scalars(select(Image).where(Image.dataset_id == found.id))}
    missing = [sha for sha in changes if sha not in images]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) are not in dataset '{dataset}', e.g. {', '.join(missing[:3])}. "
            "Name each image by the sha256 of its file."
        )
    moved = [images[sha] for sha, label in changes.items() if images[sha].label != label]
    if not moved:
        raise UserError("Those images have those classes already: nothing to relabel.")
    for image in moved:
        image.label = changes[image.sha256]
    session.flush()
    version = record_version(
        session, found, user=user.name, note=note or f"{len(moved)} image(s) relabelled"
    ) or latest(session, found.id)
    assert version is not None  # a class changed: a new version, or rows changed before now match the latest
    return version
