"""Datasets: ingest a folder (or .zip) of class sub-folders into validated, content-addressed images.

Expected layout, as in the paper's IICBU-2008 lymphoma set::

    root/CLL/001.tif
    root/FL/002.tif
    root/MCL/003.tif

A zip (or folder) whose content sits inside one wrapper folder (`lymphoma/CLL/...`) is accepted.
Every file is fully decoded at ingest, so a bad file is reported here, with its reason, instead of
failing a training run hours later. Stored files are named by the sha256 of their bytes, so the
same image in several datasets is stored once and re-ingesting is idempotent.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from core.accounts import User, require_editor
from core.config import Settings
from core.db import Dataset, Image, Run, RunStatus, SkippedFile
from core.errors import UserError
from core.files import copy_file_atomic, hold_ingest_lock
from core.limits import check_dataset_size, check_disk

IMAGE_EXTENSIONS = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}
# PIL picks the decoder from the bytes, not the extension; limiting it to these formats means
# "supported" means the same thing at ingest, in training and in prediction.
PIL_FORMATS = ("TIFF", "PNG", "JPEG", "BMP")
# Stored extension from the decoded format, so one sha256 always maps to one stored path.
STORED_EXTENSIONS = {"TIFF": ".tif", "PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp"}
# Far above any real microscopy set, low enough to stop a zip bomb filling the disk.
MAX_ZIP_BYTES = 20 * 1024**3
IGNORED_NAMES = {"__MACOSX"}


@dataclass
class IngestReport:
    dataset_id: int
    name: str
    added: int  # new images stored in this call
    already_present: int  # identical bytes already in the dataset (re-ingest is idempotent)
    duplicates: list[tuple[str, str]]  # (path, path it duplicates) within one class, stored once
    skipped: list[tuple[str, str]]  # (path, reason)
    class_counts: dict[str, int]  # images per class in the dataset after ingest


# ---------------------------------------------------------------------------------------------
# Decoding


class _BadImage(Exception):
    """A file that cannot be used; `reason` starts with a short fixed phrase shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _grey_to_uint8(im: PILImage.Image) -> PILImage.Image:
    """16/32-bit grey to 8-bit by scaling the value range; clipping would turn most pixels white."""
    a = np.asarray(im)
    if a.dtype.kind in "ui" and a.min() >= 0 and a.max() <= 65535:
        # 16-bit data (I;16, I;16B, or the 32-bit "I" container some decoders use for it).
        # Scale the full 0..65535 range rather than stretching each image, so brightness
        # stays comparable between images.
        out = a.astype(np.float64) / 257.0
    elif a.dtype.kind == "f" and a.min() >= 0 and a.max() <= 1:
        out = a.astype(np.float64) * 255.0
    else:
        lo, hi = float(a.min()), float(a.max())
        out = (a.astype(np.float64) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros(a.shape)
    return PILImage.fromarray(np.rint(out).astype(np.uint8), "L")


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    if im.mode.startswith("I") or im.mode == "F":
        return _grey_to_uint8(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent areas become white (empty slide), not black (dense tissue).
        rgba = im.convert("RGBA")
        white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")  # L, P, 1, CMYK, YCbCr


def _decode(
    src: Path | BinaryIO, max_pixels: int | None, min_side: int | None = None
) -> tuple[PILImage.Image, str, str]:
    """Open, check the header size, fully decode and convert to RGB.

    Returns (rgb image, PIL format, original PIL mode); raises _BadImage with the reason.
    """
    with warnings.catch_warnings():
        # The size check below (from settings) is the authority; PIL's own global limit would
        # only warn about sizes the user has allowed.
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        try:
            im = PILImage.open(src, formats=PIL_FORMATS)
        except UnidentifiedImageError:
            raise _BadImage("not an image: no TIFF, PNG, JPEG or BMP data found") from None
        except PILImage.DecompressionBombError as e:
            raise _BadImage(f"too many pixels: {e} (MAX_IMAGE_PIXELS)") from None
        except FileNotFoundError:
            raise
        except Exception as e:  # PIL raises many types on malformed headers
            raise _BadImage(f"corrupt: {e}") from None

        with im:
            fmt, mode = im.format or "", im.mode
            w, h = im.size
            # Checked before decoding: a tiny file can declare a 100,000 x 100,000 image.
            if max_pixels is not None and w * h > max_pixels:
                raise _BadImage(f"too many pixels: {w}x{h} is more than {max_pixels:,} (MAX_IMAGE_PIXELS)")
            if min_side is not None and min(w, h) < min_side:
                raise _BadImage(f"too small: {w}x{h}, each side must be at least {min_side} px")
            try:
                im.load()
                rgb = _to_rgb(im)
            except PILImage.DecompressionBombError as e:
                raise _BadImage(f"too many pixels: {e} (MAX_IMAGE_PIXELS)") from None
            except Exception as e:
                raise _BadImage(f"corrupt: {e}") from None
    return rgb, fmt, mode


def load_rgb(path: Path | str | BinaryIO, max_pixels: int | None = None) -> PILImage.Image:
    """Decode a TIFF/PNG/JPEG/BMP file (any mode: RGBA, L, P, 1, 16-bit, CMYK...) to 8-bit RGB.

    Also accepts an open binary file (e.g. an upload). A file that is not a usable image raises
    UserError; pass `max_pixels` (settings.max_image_pixels) for files not checked at ingest.
    """
    if isinstance(path, str):
        path = Path(path)
    try:
        rgb, _, _ = _decode(path, max_pixels)
    except _BadImage as e:
        name = path.name if isinstance(path, Path) else getattr(path, "name", "image")
        raise UserError(f"{name}: {e.reason}") from None
    return rgb


def image_path(settings: Settings, image: Image) -> Path:
    """Absolute path of a stored image."""
    return settings.app_home / image.stored_path


# ---------------------------------------------------------------------------------------------
# Finding the files


@dataclass
class _Candidate:
    path: Path  # on disk
    rel: str  # inside the dataset root, e.g. "CLL/001.tif"
    label: str


@dataclass
class _Valid:
    cand: _Candidate
    sha256: str
    format: str
    mode: str
    width: int
    height: int


def _visible(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in IGNORED_NAMES),
        key=lambda p: p.name,
    )


def _dataset_root(root: Path) -> Path:
    """Descend through wrapper folders: a root holding only one folder that itself holds
    folders but no images (`lymphoma/CLL/...`). A lone class folder is not descended into."""
    while True:
        entries = _visible(root)
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        inner = _visible(entries[0])
        has_dirs = any(p.is_dir() for p in inner)
        has_images = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in inner)
        if not has_dirs or has_images:
            return root
        root = entries[0]


def _text(name: str) -> str:
    """A file name as text the database can store: bytes that are not UTF-8 (a Latin-1 name from
    an old share, say) are written as escapes such as \\xe9."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _scan(root: Path) -> tuple[list[str], list[_Candidate], list[tuple[str, str]]]:
    """Class folder names, the files directly inside them, and what was passed over."""
    classes: list[str] = []
    candidates: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    for entry in _visible(root):
        if entry.is_file():
            skipped.append((_text(entry.name), "not in a class folder"))
            continue
        if not entry.is_dir():
            continue
        label = _text(entry.name)
        classes.append(label)
        for f in _visible(entry):
            rel = f"{label}/{_text(f.name)}"
            if f.is_dir():
                # E.g. Augmentor's output/ folder: taking it would put augmented copies of
                # test images into training.
                skipped.append(
                    (rel + "/", "sub-folder skipped: only files directly inside a class folder are taken")
                )
            elif f.is_file():
                candidates.append(_Candidate(f, rel, label))
    return classes, candidates, skipped


def _validate(cand: _Candidate, settings: Settings) -> _Valid:
    if cand.path.stat().st_size == 0:
        raise _BadImage("empty file")
    ext = cand.path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise _BadImage(f"not an image: unsupported file type '{ext or cand.path.name}'")
    rgb, fmt, mode = _decode(cand.path, settings.max_image_pixels, settings.min_image_side)
    with open(cand.path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return _Valid(cand, sha, fmt, mode, rgb.width, rgb.height)


# ---------------------------------------------------------------------------------------------
# Zip sources


def _unsafe_entry_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if name.startswith(("/", "\\")):
        return "absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "drive letter"
    if ".." in re.split(r"[/\\]", name):
        return "'..' in path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def _extract_zip(zip_path: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            # Refuse the whole archive: a crafted entry says the archive is not to be trusted.
            for info in infos:
                reason = _unsafe_entry_reason(info)
                if reason:
                    raise UserError(
                        f"Refusing {zip_path.name}: entry '{info.filename}' ({reason}) could write "
                        "outside the extraction folder. Nothing was ingested."
                    )
            # Some Windows tools write "\\" as the separator; read it as "/".
            files = [i for i in infos if not i.filename.replace("\\", "/").endswith("/")]
            folders = [i for i in infos if i.filename.replace("\\", "/").endswith("/")]
            seen: set[tuple[str, ...]] = set()
            for info in files:
                # Which of two same-named entries wins depends on the unpacking tool.
                parts = tuple(p for p in re.split(r"[/\\]", info.filename) if p not in ("", "."))
                if parts in seen:
                    raise UserError(f"Refusing {zip_path.name}: it has two entries named '{info.filename}'. "
                                    "Nothing was ingested.")
                seen.add(parts)
            if not files:
                raise UserError(f"{zip_path.name} is empty.")
            encrypted = [i.filename for i in files if i.flag_bits & 0x1]
            if encrypted:
                raise UserError(f"{zip_path.name} is password-protected (e.g. '{encrypted[0]}').")
            total = sum(i.file_size for i in files)
            if total > MAX_ZIP_BYTES:
                raise UserError(
                    f"{zip_path.name} would unpack to {total / 1e9:.1f} GB, more than the "
                    f"{MAX_ZIP_BYTES / 1e9:.0f} GB allowed. Ingest a folder instead."
                )
            if total > shutil.disk_usage(dest).free:
                raise UserError(f"Not enough disk space to unpack {zip_path.name} ({total / 1e9:.1f} GB).")
            for info in folders:  # an empty class folder is reported, as in a folder source
                dest.joinpath(*[p for p in re.split(r"[/\\]", info.filename) if p not in ("", ".")]).mkdir(
                    parents=True, exist_ok=True)
            for info in files:
                parts = [p for p in re.split(r"[/\\]", info.filename) if p not in ("", ".")]
                target = dest.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1024 * 1024)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # zlib, EOF: damaged compressed data
        raise UserError(f"{zip_path.name} is damaged: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{zip_path.name} is damaged: an entry name marked as UTF-8 is not UTF-8.") from None
    except NotImplementedError as e:  # e.g. Deflate64 from Windows Explorer
        raise UserError(f"{zip_path.name} uses an unsupported compression method: {e}") from None
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        raise UserError(f"{zip_path.name} has a file and a folder with the same name: {e}") from None
    except OSError as e:  # e.g. an entry name too long for the file system
        raise UserError(f"{zip_path.name} could not be unpacked: {e.strerror or e}") from None


@contextmanager
def _source_folder(source: Path, settings: Settings) -> Iterator[Path]:
    """The source as a folder; a zip is unpacked into a temp folder that is removed afterwards."""
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise UserError(f"Source not found: {source}")
    if not zipfile.is_zipfile(source):
        raise UserError(
            f"{source.name} is not a zip file (or it is damaged). Give a folder of class "
            "sub-folders, or a .zip of one."
        )
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ingest-", dir=settings.tmp_dir))
    try:
        _extract_zip(source, tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Groups (specimen / patient ids)


def _normalise_rel(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def _groups_from_csv(csv_path: Path, rels: list[str]) -> dict[str, str]:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"Groups file not found: {csv_path}")
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
    groups: dict[str, str] = {}
    missing: list[str] = []
    for rel in rels:
        name = PurePosixPath(rel).name
        group = table.get(rel) or (table.get(name) if name_counts[name] == 1 else None)
        if group:
            groups[rel] = group
        else:
            missing.append(rel)
    if missing:
        raise UserError(
            f"{csv_path.name} has no group for {len(missing)} image(s), e.g. "
            f"{', '.join(missing[:5])}. List each as CLASS/file (or the bare file name if unique)."
        )
    return groups


def _compile_group_pattern(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"Group pattern {pattern!r} is not a valid regular expression: {e}") from None
    if "group" not in rx.groupindex and rx.groups < 1:
        raise UserError(
            f"Group pattern {pattern!r} needs a capture group, e.g. r'^[^/]+/(\\d{{2}})' or (?P<group>...)."
        )
    return rx


def _groups_from_pattern(rx: re.Pattern[str], rels: list[str]) -> dict[str, str]:
    groups: dict[str, str] = {}
    missing: list[str] = []
    for rel in rels:
        m = rx.search(rel)
        group = (m.group("group") if "group" in rx.groupindex else m.group(1)) if m else None
        if group:
            groups[rel] = group
        else:
            missing.append(rel)
    if missing:
        raise UserError(
            f"Group pattern {rx.pattern!r} finds no group in {len(missing)} image path(s), e.g. "
            f"{', '.join(missing[:5])}."
        )
    return groups


# ---------------------------------------------------------------------------------------------
# Storage


def _stored_target(settings: Settings, v: _Valid) -> Path:
    return settings.images_dir / v.sha256[:2] / f"{v.sha256}{STORED_EXTENSIONS[v.format]}"


def _store(settings: Settings, v: _Valid) -> str:
    """Copy the original bytes into the content-addressed store; returns the path below APP_HOME."""
    target = _stored_target(settings, v)
    if not target.exists():
        copy_file_atomic(v.cand.path, target)
    return target.relative_to(settings.app_home).as_posix()


# ---------------------------------------------------------------------------------------------
# Public API


def ingest(
    session: Session,
    settings: Settings,
    source: Path,
    name: str,
    *,
    groups_csv: Path | None = None,
    group_pattern: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    user: User | None = None,
) -> IngestReport:
    """Validate every image under `source` (folder or .zip of class sub-folders) and add the new
    ones to dataset `name`, creating it if needed. `user` (when given) must be an editor; a new
    dataset records their name as created_by.

    Bad files are skipped with a reason. Input that cannot be ingested as a whole (unsafe zip,
    fewer than 2 classes, one image in two classes, groups not covering every image, more images
    than MAX_IMAGES_PER_DATASET, storage above MAX_DISK_GB) raises UserError before anything is
    stored. Rows are added and flushed; the caller commits.
    """
    if user is not None:
        require_editor(user, "add images")
    name = name.strip()
    if not name:
        raise UserError("Give the dataset a name.")
    if len(name) > 200:
        raise UserError("Dataset names can be at most 200 characters.")
    if groups_csv is not None and group_pattern:
        raise UserError("Give either a groups CSV or a group pattern, not both.")
    group_rx = _compile_group_pattern(group_pattern) if group_pattern else None

    source = Path(source).expanduser()
    check_disk(settings)  # before unpacking or decoding anything
    hold_ingest_lock(session, settings)  # until commit: files stored before their rows are visible
    with _source_folder(source, settings) as folder:
        return _ingest_folder(
            session, settings, folder, source, name, groups_csv, group_rx, progress, user
        )


def _ingest_folder(
    session: Session,
    settings: Settings,
    folder: Path,
    source: Path,
    name: str,
    groups_csv: Path | None,
    group_rx: re.Pattern[str] | None,
    progress: Callable[[int, int], None] | None,
    user: User | None = None,
) -> IngestReport:
    root = _dataset_root(folder)
    folders, candidates, skipped = _scan(root)
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
        except _BadImage as e:
            skipped.append((cand.rel, e.reason))
        if progress is not None:
            progress(i, len(candidates))

    # Identical bytes: stored once within a class; across classes the label is ambiguous.
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
        existing = {
            img.sha256: img for img in session.scalars(select(Image).where(Image.dataset_id == dataset.id))
        }
        for v in unique:
            old = existing.get(v.sha256)
            if old is not None and old.label != v.cand.label:
                conflicts.append(f"{old.original_name} (already in '{name}' as {old.label}) and {v.cand.rel}")
    if conflicts:
        raise UserError(
            f"The same image is in two classes: {'; '.join(conflicts[:5])}. An image can have "
            "only one label: remove the wrong copy and ingest again. Nothing was ingested."
        )

    new_counts = Counter(v.cand.label for v in unique)
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
    else:
        # Labels are indices into dataset.classes; a new class would shift them under
        # existing splits and runs.
        extra = sorted(label for label in new_counts if label not in dataset.classes)
        if extra:
            raise UserError(
                f"Dataset '{name}' has classes {', '.join(dataset.classes)}; {source.name} adds "
                f"{', '.join(extra)}. Ingest into a new dataset name instead."
            )

    groups: dict[str, str] | None = None
    rels = [v.cand.rel for v in unique]
    if groups_csv is not None:
        groups = _groups_from_csv(groups_csv, rels)
    elif group_rx is not None:
        groups = _groups_from_pattern(group_rx, rels)

    new = [v for v in unique if v.sha256 not in existing]
    check_dataset_size(settings, name, len(existing), len(new))
    new_bytes = sum(v.cand.path.stat().st_size for v in new if not _stored_target(settings, v).exists())
    check_disk(settings, new_bytes, f"the {len(new)} new image(s)")

    # All checks passed: from here on, store.
    if dataset is None:
        dataset = Dataset(name=name, classes=classes, source=str(source.resolve()),
                          created_by=user.name if user is not None else None)
        session.add(dataset)
        session.flush()

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
                stored_path=_store(settings, v),
                original_name=v.cand.rel,
                width=v.width,
                height=v.height,
                mode=v.mode,
                group=group,
            )
        )
        added += 1

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


def get_dataset(session: Session, name: str) -> Dataset:
    """The dataset called `name`; UserError listing the known names when there is none."""
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        names = session.scalars(select(Dataset.name).order_by(Dataset.name)).all()
        known = ", ".join(names) if names else "none yet, ingest one first"
        raise UserError(f"No dataset named '{name}'. Known datasets: {known}.")
    return dataset


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.name)))


def delete_dataset(session: Session, settings: Settings, name: str, *, user: User | None = None) -> None:
    """Delete the dataset's rows (images, skipped files, and by cascade its splits and runs).
    `user` (when given) must be an editor.

    Stored files that no other dataset uses are removed once the caller's transaction commits,
    so a rollback never leaves rows pointing at missing files.
    """
    if user is not None:
        require_editor(user, "delete datasets")
    dataset = get_dataset(session, name)
    active = session.scalar(
        select(func.count())
        .select_from(Run)
        .where(Run.dataset_id == dataset.id, Run.status.in_([RunStatus.queued, RunStatus.running]))
    )
    if active:
        raise UserError(f"Dataset '{name}' has {active} queued or running run(s); cancel them first.")

    stored = {img.sha256: img.stored_path for img in dataset.images}
    run_ids = session.scalars(select(Run.id).where(Run.dataset_id == dataset.id)).all()
    session.delete(dataset)
    session.flush()

    shas = list(stored)
    still_used: set[str] = set()
    for i in range(0, len(shas), 500):  # stay under SQLite's bound-parameter limit
        chunk = shas[i : i + 500]
        still_used.update(session.scalars(select(Image.sha256).where(Image.sha256.in_(chunk))))
    unused = [settings.app_home / path for sha, path in stored.items() if sha not in still_used]
    # The runs' folders (checkpoints, logs) go with their rows.
    _remove_files_after_commit(session, unused + [settings.runs_dir / str(i) for i in run_ids])


def _remove_files_after_commit(session: Session, paths: list[Path]) -> None:
    state = {"rolled_back": False}

    def remove(_session: Session) -> None:
        if not state["rolled_back"]:
            for p in paths:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def cancel(_session: Session) -> None:
        state["rolled_back"] = True

    event.listen(session, "after_commit", remove, once=True)
    event.listen(session, "after_rollback", cancel, once=True)
