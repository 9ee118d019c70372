"""Commands over datasets: `ingest` (a folder, a .zip or a folder of whole slides), `datasets` (the
list), `versions` and `diff` (a dataset's versions, and what changed between two) and `groups` (a
manifest of approximate specimen groups, for `ingest --groups-csv`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.access.limits import disk_full_is_user_error
from core.cli.common import cli_user, command
from core.config import Settings
from core.data.groups import DEFAULT_BLOCK_SIZE
from core.errors import UserError
from core.jobs.foreground import Bars


def cmd_ingest(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import slide_ingest

    if slide_ingest.is_slide_folder(Path(args.path)):
        return _ingest_slides(args, settings, Session)
    if (args.tile_px, args.tile_mpp, args.max_tiles) != (None, None, None):
        raise UserError(
            f"--tile-px, --tile-mpp and --max-tiles are for folders of whole-slide images; "
            f"{Path(args.path).name} holds images."
        )
    bars = Bars()
    # The commit writes too: a full disk there is reported like one during the ingest.
    with disk_full_is_user_error(settings, f"dataset '{args.name}'"), Session.begin() as s:
        report = slide_ingest.ingest_fields(
            s,
            settings,
            Path(args.path),
            args.name,
            mpp=args.mpp,
            groups_csv=args.groups_csv,
            group_pattern=args.group_pattern,
            progress=lambda d, t: bars("check images", d, t),
            user=cli_user(args),
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
                s,
                settings,
                Path(args.path),
                args.name,
                mpp=args.mpp,
                tile_px=args.tile_px,
                tile_mpp=args.tile_mpp,
                max_tiles=args.max_tiles,
                progress=lambda d, t: bars("tile slides", d, t),
                user=cli_user(args),
            )
    finally:
        bars.close()
    for rel, _label, kept in report.slides:
        print(f"slide {rel}: {kept} tiles")
    for rel in report.already_present:
        print(f"slide {rel}: already in the dataset")
    for rel, reason in report.skipped:
        print(f"skipped {rel}: {reason}")
    scale = report.scale
    print(
        f"{len(report.slides)} slide(s) tiled, {report.tiles_kept} tiles of {scale.tile_px} px at "
        f"{scale.mpp:g} microns per pixel (at most {scale.max_tiles or 'all'} per slide)"
    )
    _print_ingest(report.ingest)


def _print_ingest(report) -> None:
    for path, reason in report.skipped:
        print(f"skipped {path}: {reason}")
    for path, first in report.duplicates:
        print(f"duplicate {path}: same bytes as {first}, stored once")
    counts = ", ".join(f"{c} {n}" for c, n in report.class_counts.items())
    print(
        f"dataset {report.name!r}: {report.added} added, {report.already_present} already present, "
        f"{len(report.skipped)} skipped; classes: {counts}"
    )


def cmd_datasets(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import datasets

    with Session() as s:
        for d in datasets.list_datasets(s):
            groups = {im.group for im in d.images if im.group is not None}
            counts = {c: sum(im.label == c for im in d.images) for c in d.classes}
            print(f"{d.name}: {len(d.images)} images {counts}" + (f", {len(groups)} groups" if groups else ""))


def cmd_versions(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import versions

    with Session() as s:
        found = versions.version_list(s, args.name)
    for v in found:
        counts = ", ".join(f"{c} {n}" for c, n in v.counts.items())
        print(
            f"version {v.number}\t{v.created_at:%Y-%m-%d %H:%M} UTC\t{v.created_by or '-'}\t"
            f"{v.images} images ({counts})\t{v.note}"
        )


def cmd_diff(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import versions

    with Session() as s:
        found = versions.diff(s, args.name, args.old, args.new)
    print(f"dataset {args.name!r}, {found.summary()}")
    for line in found.lines():
        print("\t".join((line.change, line.image, line.label, line.group or "-", line.sha256)))


def cmd_groups(args: argparse.Namespace, settings: Settings, Session) -> None:
    from core.data import groups

    rows = groups.block_manifest(args.root, args.block_size)
    groups.write_manifest(rows, sys.stdout)
    print(f"{len(rows)} files in {len({g for _, g in rows})} groups", file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "ingest",
        cmd_ingest,
        help="add a folder of class sub-folders (or a .zip of one) as a dataset; "
        "slides are tiled, each tile grouped by its slide",
    )
    p.add_argument(
        "path",
        help="folder with one sub-folder per class, of images or of whole-slide images, or a "
        ".zip of such a folder of images",
    )
    p.add_argument("--name", required=True, help="dataset name; ingesting again into a name adds new images")
    p.add_argument("--groups-csv", type=Path, help="CSV with columns file,group (specimen/patient of each image)")
    p.add_argument(
        "--group-pattern",
        help=r"regex on the relative path whose group 'group' (or 1) is the specimen id, e.g. '^[^/]+/(\d+)_'",
    )
    p.add_argument("--user", help="recorded as the dataset's creator (default: your login name)")
    p.add_argument(
        "--mpp",
        type=float,
        help="microns per pixel of the files: for slides, those whose file records "
        "none; for images, recorded so a model knows the scale it was trained at",
    )
    p.add_argument("--tile-px", type=int, help="slides: side of each tile in pixels (default: SLIDE_TILE_PX)")
    p.add_argument("--tile-mpp", type=float, help="slides: microns per pixel of the tiles (default: SLIDE_MPP)")
    p.add_argument("--max-tiles", type=int, help="slides: most tiles per slide, 0 for all (default: SLIDE_MAX_TILES)")

    command(sub, "datasets", cmd_datasets, help="list datasets")

    p = command(
        sub, "versions", cmd_versions, help="a dataset's versions, newest first: when, by whom, images per class, note"
    )
    p.add_argument("name", help="dataset name")
    p = command(
        sub,
        "diff",
        cmd_diff,
        help="what changed between two versions of a dataset: the images added, "
        "removed, relabelled (and regrouped), one a line: change, image, class, group, sha256",
    )
    p.add_argument("name", help="dataset name")
    p.add_argument("old", type=int, help="a version's number")
    p.add_argument("new", type=int, help="another version's number")

    p = command(
        sub,
        "groups",
        cmd_groups,
        database=False,
        help="print a manifest of approximate specimen groups (CSV file,group) for `ingest --groups-csv`",
        description="Print a groups manifest (CSV file,group) that puts blocks of consecutive file numbers of "
        "each class into one group: an APPROXIMATION of specimens for sets whose neighbouring file numbers "
        "come from one slide. Use real specimen ids when you have them.",
    )
    p.add_argument("root", type=Path, help="folder with one sub-folder per class")
    p.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help="most images per group (9 gives ~30 groups for the 256-image IICBU-2008 dev copy)",
    )
