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

    python -m core.data.groups ROOT --block-size 9 > groups.csv
    python -m core ingest ROOT --name lymphoma --groups-csv groups.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path
from typing import TextIO

from core.data.datasets import IMAGE_EXTENSIONS
from core.errors import UserError

# 9 cuts the dev copy of IICBU-2008 (CLL 78, FL 93, MCL 85 images, each class one run of
# consecutive numbers) into 9 + 11 + 10 = 30 groups, about the ~30 specimens the full set of
# 374 images comes from.
DEFAULT_BLOCK_SIZE = 9

_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last run of digits in the file stem


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".") and p.name != "__MACOSX"),
                  key=lambda p: p.name)


def _class_root(root: Path) -> Path:
    """Descend through a lone wrapper folder (`lymphoma/CLL/...`), as ingest does."""
    while True:
        entries = _visible(root)
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        inner = _visible(entries[0])
        if not any(p.is_dir() for p in inner) or any(p.suffix.lower() in IMAGE_EXTENSIONS for p in inner if p.is_file()):
            return root
        root = entries[0]


def _file_number(path: Path) -> int | None:
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
        files = [p for p in _visible(class_dir) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        unnumbered = [p.name for p in files if _file_number(p) is None]
        if unnumbered:
            raise UserError(
                f"Blocks of consecutive numbers need a number in every file name; {class_dir.name}/ has "
                f"{len(unnumbered)} without one, e.g. {', '.join(unnumbered[:3])}."
            )
        by_number: dict[int, list[Path]] = {}
        for p in files:
            by_number.setdefault(_file_number(p), []).append(p)  # e.g. 001.tif and 001.png
        if not by_number:
            continue
        width = max(3, len(str(max(by_number))))
        for block in _blocks(sorted(by_number), block_size):
            group = f"{class_dir.name}-{block[0]:0{width}d}-{block[-1]:0{width}d}"
            for n in block:
                rows.extend((f"{class_dir.name}/{p.name}", group) for p in by_number[n])
    return rows


def write_manifest(rows: list[tuple[str, str]], out: Path | TextIO) -> None:
    """Write `rows` as the CSV that `ingest --groups-csv` reads (header `file,group`)."""
    if isinstance(out, (str, Path)):
        with open(out, "w", newline="", encoding="utf-8") as f:
            write_manifest(rows, f)
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "group"])
    writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.data.groups",
        description="Print a groups manifest (CSV file,group) that puts blocks of consecutive file numbers of "
        "each class into one group: an APPROXIMATION of specimens for sets whose neighbouring file numbers "
        "come from one slide. Use real specimen ids when you have them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", type=Path, help="folder with one sub-folder per class")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help="most images per group (9 gives ~30 groups for the 256-image IICBU-2008 dev copy)")
    args = parser.parse_args(argv)
    try:
        rows = block_manifest(args.root, args.block_size)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_manifest(rows, sys.stdout)
    n_groups = len({g for _, g in rows})
    print(f"{len(rows)} files in {n_groups} groups", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
