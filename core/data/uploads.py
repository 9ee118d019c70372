"""Datasets from the web app: uploaded files or a folder on the server, handed to core.data.ingest.

Uploads are written to a temporary folder under APP_HOME/tmp (a zip as it came, loose image files as
CLASS/file) and ingested from there; the folder is removed afterwards whatever happens. A server
folder can only be imported from below one of settings.import_roots, so a web user cannot read
arbitrary paths on the server.
A zip (uploaded, or on the server) or a server folder whose class folders hold whole-slide images is
tiled into a dataset of tiles (core.data.slide_ingest.ingest_slides, with `SlideOptions`); others hold
field images (ingest_fields). Slides in a server folder are read where they lie and their paths
recorded; slides from a zip are a copy, unpacked into the temporary folder and removed with it.
Uploads larger than MAX_UPLOAD_MB, or arriving while APP_HOME uses more than MAX_DISK_GB, are
refused before anything is written; a disk that fills up while one is written is a UserError too.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO

from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_disk, check_upload_size, disk_full_is_user_error
from core.config import Settings
from core.data import slide_ingest
from core.data.ingest import IngestReport, ingest
from core.data.slide_ingest import SlideIngestReport
from core.data.sources import source_folder
from core.errors import UserError
from core.progress import ProgressCallback
from core.store.db import Dataset
from core.store.files import hold_ingest_lock, write_bytes_atomic

Content = bytes | BinaryIO
Report = IngestReport | SlideIngestReport  # images checked, or slides tiled and their tiles checked


@dataclass(frozen=True)
class SlideOptions:
    """How a source's whole-slide images are read and tiled (core.data.slide_ingest.ingest_slides); None
    takes the setting (SLIDE_TILE_PX, SLIDE_MPP, SLIDE_MAX_TILES). `mpp` is the slides' microns per pixel
    where their files record none; for field images, their microns per pixel, recorded as the dataset's
    scale (ingest_fields). The tiling is for slides only."""

    mpp: float | None = None
    tile_px: int | None = None
    tile_mpp: float | None = None
    max_tiles: int | None = None


# Folder and file names a browser may send: keep letters, digits and a few separators.
_UNSAFE = re.compile(r"[^\w .()+-]", re.UNICODE)


def _safe_name(name: str, what: str) -> str:
    """A single path component from a user-supplied name (no folders, no '..')."""
    base = PurePath(name.replace("\\", "/")).name.strip()
    base = _UNSAFE.sub("_", base).strip(". ")
    if not base:
        raise UserError(f"{what} {name!r} is not a usable name.")
    return base


def _write(content: Content, target: Path) -> None:
    # A scratch copy, removed after the ingest: no fsync, a crash loses nothing the user lacks.
    write_bytes_atomic(target, content, fsync=False)


@contextmanager
def _workdir(settings: Settings) -> Iterator[Path]:
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.tmp_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _groups_file(folder: Path, groups_csv: Content | None) -> Path | None:
    if groups_csv is None:
        return None
    path = folder / "groups.csv"
    _write(groups_csv, path)
    return path


def _label_source(session: Session, report: Report, temp_source: Path, label: str) -> None:
    """A new dataset records where it came from; a temp path would mean nothing to anyone."""
    images = report.ingest if isinstance(report, SlideIngestReport) else report
    dataset = session.get(Dataset, images.dataset_id)
    if dataset is not None and dataset.source == str(temp_source.resolve()):
        dataset.source = label
        session.flush()


@contextmanager
def _unpacked(zip_path: Path, into: Path, settings: Settings) -> Iterator[Path]:
    """The zip unpacked (after core.data.sources' checks of its directory) as a folder of the zip's own
    name inside the work folder `into`, so that a message about its content names the zip, not a
    temporary folder. The work folder's removal takes it."""
    with source_folder(zip_path, settings) as unpacked:
        named = into / "unpacked" / zip_path.name
        named.parent.mkdir()
        unpacked.rename(named)  # within APP_HOME/tmp: a rename, not a copy
        yield named


def _ingest_source(
    session: Session,
    settings: Settings,
    source: Path,
    name: str,
    *,
    groups_csv: Path | None,
    group_pattern: str | None,
    slides: SlideOptions | None,
    keep_paths: bool,
    progress: ProgressCallback | None,
    tile_progress: ProgressCallback | None,
    user: User,
) -> Report:
    """Ingest the folder `source`: its slides tiled when its class folders hold whole-slide images
    (`keep_paths`: record where each lies), else its images checked."""
    options = slides or SlideOptions()
    if not slide_ingest.is_slide_folder(source):
        return slide_ingest.ingest_fields(
            session,
            settings,
            source,
            name,
            mpp=options.mpp,
            groups_csv=groups_csv,
            group_pattern=group_pattern,
            progress=progress,
            user=user,
        )
    if groups_csv is not None or group_pattern:
        raise UserError(
            f"{source.name} holds whole-slide images, whose tiles are grouped by their slide: the table "
            "of specimens and the specimen id in the file names are for images. Leave them out."
        )
    return slide_ingest.ingest_slides(
        session,
        settings,
        source,
        name,
        mpp=options.mpp,
        tile_px=options.tile_px,
        tile_mpp=options.tile_mpp,
        max_tiles=options.max_tiles,
        keep_paths=keep_paths,
        progress=tile_progress,
        user=user,
    )


def ingest_zip(
    session: Session,
    settings: Settings,
    content: Content,
    filename: str,
    name: str,
    *,
    groups_csv: Content | None = None,
    group_pattern: str | None = None,
    slides: SlideOptions | None = None,
    progress: ProgressCallback | None = None,
    tile_progress: ProgressCallback | None = None,
    user: User,
) -> Report:
    """Ingest an uploaded .zip of class folders into dataset `name` (created if new): of images, or of
    whole-slide images tiled as `slides` says (their copies removed afterwards). `progress(done, total)`
    counts images checked, `tile_progress` slides tiled."""
    require_editor(user, "add images")  # before the upload is written anywhere
    if not filename.lower().endswith(".zip"):
        raise UserError(f"{filename} is not a .zip file. Upload a .zip with one folder per class.")
    # Before writing anything: the upload's size (MAX_UPLOAD_MB) and the storage used (MAX_DISK_GB).
    size = check_upload_size(settings, [content])
    check_disk(settings, size, "this upload")
    hold_ingest_lock(session, settings)  # the work folder is not a leftover while this runs
    with _workdir(settings) as folder, disk_full_is_user_error(settings, f"the upload {filename}"):
        path = folder / _safe_name(filename, "File name")
        _write(content, path)
        if path.stat().st_size == 0:
            raise UserError(f"{filename} is empty.")
        groups = _groups_file(folder, groups_csv)
        with _unpacked(path, folder, settings) as unpacked:
            report = _ingest_source(
                session,
                settings,
                unpacked,
                name,
                groups_csv=groups,
                group_pattern=group_pattern,
                slides=slides,
                keep_paths=False,
                progress=progress,
                tile_progress=tile_progress,
                user=user,
            )
            _label_source(session, report, unpacked, f"upload {filename}")
        return report


def ingest_files(
    session: Session,
    settings: Settings,
    files: Sequence[tuple[str, str, Content]],
    name: str,
    *,
    groups_csv: Content | None = None,
    group_pattern: str | None = None,
    progress: ProgressCallback | None = None,
    user: User,
) -> IngestReport:
    """Ingest loose uploaded images, each given as (class name, file name, content).

    A new dataset needs at least two classes; an existing one can take more images of its classes.
    Two uploads with the same name in one class keep both (the second gets a numbered name).
    """
    require_editor(user, "add images")
    if not files:
        raise UserError("No files uploaded. Choose image files for at least two classes.")
    size = check_upload_size(settings, [content for _, _, content in files])
    check_disk(settings, size, "this upload")
    hold_ingest_lock(session, settings)  # the work folder is not a leftover while this runs
    with _workdir(settings) as folder, disk_full_is_user_error(settings, f"the upload of {len(files)} file(s)"):
        root = folder / "uploaded files"
        root.mkdir()
        for label, filename, content in files:
            label_dir = root / _safe_name(label, "Class name")
            target = label_dir / _safe_name(filename, "File name")
            k = 1
            while target.exists():
                target = label_dir / f"{Path(target.name).stem.rsplit('~', 1)[0]}~{k}{target.suffix}"
                k += 1
            _write(content, target)
        report = ingest(
            session,
            settings,
            root,
            name,
            groups_csv=_groups_file(folder, groups_csv),
            group_pattern=group_pattern,
            progress=progress,
            user=user,
        )
        _label_source(session, report, root, f"upload of {len(files)} file(s)")
        return report


def check_import_path(settings: Settings, path: str | Path) -> Path:
    """The resolved `path` if it lies inside one of settings.import_roots; UserError otherwise."""
    if not settings.import_roots:
        raise UserError(
            "Importing folders from the server is turned off. An administrator can allow it by setting "
            "IMPORT_ROOTS to the folder(s) that may be imported from."
        )
    text = str(path).strip()
    if not text:
        raise UserError("Give the path of a folder (or .zip) on the server.")
    resolved = Path(text).expanduser().resolve()  # follows symlinks: a link cannot lead outside
    if not any(resolved == root or resolved.is_relative_to(root) for root in settings.import_roots):
        roots = ", ".join(str(r) for r in settings.import_roots)
        raise UserError(f"{text} is outside the folders this server may import from ({roots}).")
    if not resolved.exists():
        raise UserError(f"{text} does not exist on the server.")
    return resolved


def import_folder(
    session: Session,
    settings: Settings,
    path: str | Path,
    name: str,
    *,
    groups_csv: Content | None = None,
    group_pattern: str | None = None,
    slides: SlideOptions | None = None,
    progress: ProgressCallback | None = None,
    tile_progress: ProgressCallback | None = None,
    user: User,
) -> Report:
    """Ingest a folder (or .zip) on the server, which must lie inside settings.import_roots: of images,
    or of whole-slide images tiled as `slides` says. Slides in a folder are read where they lie, and
    their paths recorded; a zip's are a copy, removed afterwards."""
    require_editor(user, "add images")
    source = check_import_path(settings, path)
    check_disk(settings)
    hold_ingest_lock(session, settings)  # the work folder is not a leftover while this runs
    with _workdir(settings) as folder, disk_full_is_user_error(settings, f"the import of {source.name}"):
        options = dict(
            groups_csv=_groups_file(folder, groups_csv),
            group_pattern=group_pattern,
            slides=slides,
            progress=progress,
            tile_progress=tile_progress,
            user=user,
        )
        if source.is_dir():
            return _ingest_source(session, settings, source, name, keep_paths=True, **options)
        with _unpacked(source, folder, settings) as unpacked:
            report = _ingest_source(session, settings, unpacked, name, keep_paths=False, **options)
            _label_source(session, report, unpacked, str(source))
        return report
