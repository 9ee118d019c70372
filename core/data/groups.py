"""Approximate specimen groups for a folder dataset from blocks of consecutive file numbers.

Some sets, like the IICBU-2008 lymphoma images, lost their specimen ids but kept the source's
order in the file names: neighbouring numbers usually come from one slide. Cutting each class's
numbers into blocks of about `block_size` consecutive numbers gives groups that keep most
neighbours together, so a grouped split keeps them on one side. It is an APPROXIMATION: a block
boundary can still fall inside a specimen (its two halves then land in different groups and may
be split apart), and one block can hold the end of one specimen and the start of the next. Use
real specimen ids whenever they are known.

Writes the manifest that `ingest --groups-csv` reads (header `file,group`, one CLASS/file row per
image)::

    python -m core groups ROOT --block-size 9 > groups.csv
    python -m core ingest ROOT --name lymphoma --groups-csv groups.csv

or, for a dataset already ingested (the Datasets page's "Estimate specimen groups from the
images"), `estimate_groups` over its images' names and `apply_groups` to store the estimate.

The groups an ingest is given are read here too, beside the writer of the manifest: from a CSV
(`groups_from_csv`: this manifest, or one of real specimen ids) or from a regular expression over
each image's CLASS/file path (`groups_from_pattern`, `ingest --group-pattern`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.data.datasets import get_dataset, lock_dataset
from core.data.decoding import IMAGE_EXTENSIONS
from core.data.versions import record_version
from core.errors import UserError
from core.store.db import Image

# 9 cuts the dev copy of IICBU-2008 (CLL 78, FL 93, MCL 85 images, each class one run of
# consecutive numbers) into 9 + 11 + 10 = 30 groups, about the ~30 specimens the full set of
# 374 images comes from.
DEFAULT_BLOCK_SIZE = 9

_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits in the file stem

# A group pattern (`ingest --group-pattern`) for names like IICBU-2008's CLASS/NNN.png, where
# specimen ids are lost: the class and the file number's tens, so CLL/000.png to CLL/009.png form
# group "CLL/00". Blocks of ten aligned to round numbers, another approximation of specimens.
EXAMPLE_PATTERN = r"^([^/]+/\d\d)\d"
EXAMPLE_NAMES = ("CLL/000.png", "CLL/009.png", "FL/113.png")  # what it is shown on


def _visible(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"), key=lambda p: p.name
    )


def _class_root(root: Path) -> Path:
    """Descend through a lone wrapper folder (`lymphoma/CLL/...`), as ingest does."""
    while True:
        entries = _visible(root)
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        inner = _visible(entries[0])
        if not any(p.is_dir() for p in inner) or any(
            p.suffix.lower() in IMAGE_EXTENSIONS for p in inner if p.is_file()
        ):
            return root
        root = entries[0]


def _file_number(path: PurePosixPath) -> int | None:
    m = _NUMBER.search(path.stem)
    return int(m.group(1)) if m else None


def _blocks(numbers: list[int], block_size: int) -> list[list[int]]:
    """Cut sorted numbers into runs (a gap in the numbering ends a run), then each run into
    ceil(len / block_size) blocks of near-equal size, so no block is a tiny remainder."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    blocks = []
    for run in runs:
        k = math.ceil(len(run) / block_size)
        size, extra = divmod(len(run), k)
        start = 0
        for i in range(k):
            stop = start + size + (1 if i < extra else 0)
            blocks.append(run[start:stop])
            start = stop
    return blocks


def block_manifest(root: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[str, str]]:
    """(file, group) for every image file directly inside the class folders of `root`.

    `file` is CLASS/name as ingest expects; `group` names the class and the block's first and last
    file numbers, e.g. "CLL-000-008". Within a class, files are ordered by the last number in
    their name; a gap in the numbering (e.g. images held back) always starts a new block.

    Args:
        root: folder with one sub-folder per class (a lone wrapper folder is descended into).
        block_size: most images per block; blocks of one run of numbers are of near-equal size.

    Raises:
        UserError: no class folders, a file name without a number, or a block size below 1.
    """
    root = Path(root)
    if block_size < 1:
        raise UserError(f"block size must be at least 1, got {block_size}.")
    if not root.is_dir():
        raise UserError(f"Not a folder: {root}")
    root = _class_root(root)
    class_dirs = [p for p in _visible(root) if p.is_dir()]
    if not class_dirs:
        raise UserError(f"{root} has no class sub-folders.")

    rows: list[tuple[str, str]] = []
    for class_dir in class_dirs:
        names = [p.name for p in _visible(class_dir) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        rows.extend(
            (f"{class_dir.name}/{name}", group) for name, group in _class_blocks(class_dir.name, names, block_size)
        )
    return rows


def _class_blocks(label: str, names: Sequence[str], block_size: int) -> list[tuple[str, str]]:
    """(name, group) for the files `names` of class `label`: blocks of consecutive file numbers,
    each group named for the class and its block's first and last numbers ("CLL-000-008")."""
    unnumbered = [n for n in names if _file_number(PurePosixPath(n)) is None]
    if unnumbered:
        raise UserError(
            f"Blocks of consecutive numbers need a number in every file name; {label}/ has "
            f"{len(unnumbered)} without one, e.g. {', '.join(PurePosixPath(n).name for n in unnumbered[:3])}."
        )
    by_number: dict[int, list[str]] = {}
    for n in names:
        by_number.setdefault(_file_number(PurePosixPath(n)), []).append(n)  # e.g. 001.tif and 001.png
    if not by_number:
        return []
    width = max(3, len(str(max(by_number))))
    rows = []
    for block in _blocks(sorted(by_number), block_size):
        group = f"{label}-{block[0]:0{width}d}-{block[-1]:0{width}d}"
        for n in block:
            rows.extend((name, group) for name in by_number[n])
    return rows


@dataclass(frozen=True)
class GroupEstimate:
    """Specimen groups estimated from file numbers, for the images of one dataset."""

    groups: Mapping[str, str]  # each image's name in its source ("CLL/000.png") -> its group
    labels: Mapping[str, str]  # each group -> its class
    block_size: int

    @property
    def n_groups(self) -> int:
        return len(set(self.groups.values()))

    @property
    def basis(self) -> str:
        """What the estimate rests on, in plain words."""
        return (
            f"An approximation from the file names: within each class, up to {self.block_size} images with "
            "consecutive numbers form one group, because neighbouring numbers usually come from one "
            "specimen. A group can still cut a specimen in two or hold the end of one and the start "
            "of the next; use real specimen ids when they are known."
        )

    def sizes(self) -> dict[str, int]:
        """Images per group, in the order of the groups."""
        counts: dict[str, int] = {}
        for group in self.groups.values():
            counts[group] = counts.get(group, 0) + 1
        return counts

    def per_class(self) -> dict[str, tuple[int, int, int]]:
        """For each class: its number of groups and the fewest and most images in one."""
        by_class: dict[str, list[int]] = {}
        for group, n in self.sizes().items():
            by_class.setdefault(self.labels[group], []).append(n)
        return {label: (len(ns), min(ns), max(ns)) for label, ns in by_class.items()}


def estimate_groups(images: Iterable[tuple[str, str]], block_size: int = DEFAULT_BLOCK_SIZE) -> GroupEstimate:
    """Groups for images given as (class label, name in the source), e.g. a dataset's images:
    blocks of consecutive file numbers within each class, as `block_manifest` cuts a folder.

    Raises:
        UserError: a file name without a number, or a block size below 1.
    """
    if block_size < 1:
        raise UserError(f"block size must be at least 1, got {block_size}.")
    by_class: dict[str, list[str]] = {}
    for label, name in images:
        by_class.setdefault(label, []).append(name)
    groups: dict[str, str] = {}
    labels: dict[str, str] = {}
    for label in sorted(by_class):
        for name, group in _class_blocks(label, sorted(by_class[label]), block_size):
            groups[name] = group
            labels[group] = label
    return GroupEstimate(groups, labels, block_size)


def apply_groups(session: Session, dataset_name: str, groups: Mapping[str, str], *, user: User) -> int:
    """Give every image of dataset `dataset_name` its group from `groups` (name in the source ->
    group), replacing the groups it had; the number of images changed. Splits already made keep
    their parts: only splits made afterwards use the new groups. `user` must be an editor.

    Raises:
        UserError: no such dataset, or an image `groups` does not name (the dataset changed since).
    """
    require_editor(user, "change specimen groups")
    dataset = lock_dataset(session, get_dataset(session, dataset_name))
    images = session.scalars(select(Image).where(Image.dataset_id == dataset.id)).all()
    missing = [im.original_name for im in images if im.original_name not in groups]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) of '{dataset_name}' have no group in the estimate, e.g. "
            f"{', '.join(missing[:3])}: the dataset changed since. Estimate the groups again."
        )
    changed = 0
    for im in images:
        if im.group != groups[im.original_name]:
            im.group = groups[im.original_name]
            changed += 1
    dataset.groups_estimated = True
    session.flush()
    # Groups are part of a dataset version: the new ones make its next (core/data/versions.py).
    record_version(
        session,
        dataset,
        user=user.name,
        note=f"specimen groups estimated from file numbers ({changed} image(s) changed)",
    )
    return changed


def write_manifest(rows: list[tuple[str, str]], out: Path | TextIO) -> None:
    """Write `rows` as the CSV that `ingest --groups-csv` reads (header `file,group`)."""
    if isinstance(out, (str, Path)):
        with open(out, "w", newline="", encoding="utf-8") as f:
            write_manifest(rows, f)
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "group"])
    writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# The groups an ingest is given


def _normalise_rel(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def groups_from_csv(csv_path: Path, rels: list[str]) -> dict[str, str]:
    """Each of the image paths `rels` (CLASS/file) with its group from the CSV at `csv_path` (header
    `file,group`; a bare file name stands for a path where it is unique). UserError for a file that
    cannot be read, a file given two groups or an image without one."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"Groups file not found: {csv_path.name}")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # -sig: Excel writes a BOM
    except UnicodeDecodeError:
        raise UserError(f"{csv_path.name} is not UTF-8 text.") from None
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise UserError(f"{csv_path.name} is not a valid CSV file: {e}") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "file" not in header or "group" not in header:
        raise UserError(f"{csv_path.name} needs a header row 'file,group'.")
    i_file, i_group = header.index("file"), header.index("group")

    table: dict[str, str] = {}
    for row in rows[1:]:
        if len(row) <= max(i_file, i_group):
            continue
        key, group = _normalise_rel(row[i_file]), row[i_group].strip()
        if not key or not group:
            continue
        if table.setdefault(key, group) != group:
            raise UserError(f"{csv_path.name} gives '{key}' two groups: {table[key]} and {group}.")

    name_counts = Counter(PurePosixPath(r).name for r in rels)

    def group_of(rel: str) -> str | None:
        name = PurePosixPath(rel).name
        return table.get(rel) or (table.get(name) if name_counts[name] == 1 else None)

    groups, missing = _each_group(rels, group_of)
    if missing:
        raise UserError(
            f"{csv_path.name} has no group for {len(missing)} image(s), e.g. "
            f"{', '.join(missing[:5])}. List each as CLASS/file (or the bare file name if unique)."
        )
    return groups


def _each_group(rels: list[str], group_of) -> tuple[dict[str, str], list[str]]:
    """Each path's group where `group_of` finds one, and the paths it finds none for."""
    groups = {rel: g for rel in rels if (g := group_of(rel))}
    return groups, [rel for rel in rels if rel not in groups]


def compile_group_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression `pattern` with a capture group (or one named `group`); UserError otherwise."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"Group pattern {pattern!r} is not a valid regular expression: {e}") from None
    if "group" not in rx.groupindex and rx.groups < 1:
        raise UserError(
            f"Group pattern {pattern!r} needs a capture group, e.g. r'^[^/]+/(\\d{{2}})' or (?P<group>...)."
        )
    return rx


def groups_from_pattern(rx: re.Pattern[str], rels: list[str]) -> dict[str, str]:
    """Each of the image paths `rels` with its group, what `rx` captures in it; UserError for a path
    it finds none in."""

    def group_of(rel: str) -> str | None:
        m = rx.search(rel)
        return (m.group("group") if "group" in rx.groupindex else m.group(1)) if m else None

    groups, missing = _each_group(rels, group_of)
    if missing:
        raise UserError(
            f"Group pattern {rx.pattern!r} finds no group in {len(missing)} image path(s), e.g. "
            f"{', '.join(missing[:5])}."
        )
    return groups


if __name__ == "__main__":
    # Where the manifest's command was first, kept for scripts: `python -m core groups ARGS`, run in this
    # process's place (so that this library module does not import the command line).
    os.execv(sys.executable, [sys.executable, "-m", "core", "groups", *sys.argv[1:]])
