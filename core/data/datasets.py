"""Datasets: ingest a folder (or .zip) of class sub-folders into validated, content-addressed images.

Expected layout, as in the paper's IICBU-2008 lymphoma set::

    root/CLL/001.tif
    root/FL/002.tif
    root/MCL/003.tif

A zip (or folder) whose content sits inside one wrapper folder (`lymphoma/CLL/...`) is accepted.
Every file is fully decoded at ingest, so a bad file is reported here, with its reason, instead of
failing a training run hours later. Stored files are named by the sha256 of their bytes, so the
same image in several datasets is stored once and re-ingesting is idempotent.

What is not read is listed with its reason: hidden files and folders (not the operating system's
own, such as __MACOSX/ and .DS_Store), and links that lead out of the folder being ingested, shown
by their own name only. A zip is checked from its directory before anything is unpacked
(MAX_ZIP_ENTRIES, MAX_UNPACKED_MB, MAX_DISK_GB, compression ratio). An image is refused on its
header's size (MAX_IMAGE_PIXELS) before any pixel is decoded. A caller that needs fewer pixels
(prediction, core/inference/service.py) has images past REDUCE_ABOVE_PIXELS decoded reduced, with no
full-size copy beside the decoded frame (`load_rgb`'s reduce_to).
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import hashlib
import io
import re
import shutil
import stat
import tempfile
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
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.config import Settings
from core.store.db import Dataset, Image, Run, RunStatus, SkippedFile
from core.errors import UserError
from core.store.files import copy_file_atomic, hold_ingest_lock, remove_unless_shared
from core.access.limits import (
    check_dataset_size, check_disk, check_name_length, check_zip, disk_full_is_user_error, is_disk_full,
)

IMAGE_EXTENSIONS = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp"}
# PIL picks the decoder from the bytes, not the extension; limiting it to these formats means
# "supported" means the same thing at ingest, in training and in prediction.
PIL_FORMATS = ("TIFF", "PNG", "JPEG", "BMP")
# Stored extension from the decoded format, so one sha256 always maps to one stored path.
STORED_EXTENSIONS = {"TIFF": ".tif", "PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "BMP": ".bmp"}
OS_JUNK = {"__MACOSX", ".DS_Store"}  # and ._NAME files: passed over silently (_is_junk)
# An entry that unpacks to more than MAX_ZIP_RATIO times its compressed size is no microscopy
# image (those compress 1 to 3 times) but a zip bomb; entries up to RATIO_FREE_BYTES (a blank
# mask, a text file) may compress as well as they like.
MAX_ZIP_RATIO = 100
RATIO_FREE_BYTES = 1024**2


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


# Rows converted at a time from 16/32-bit to 8-bit: about a million pixels, so the float copies
# the scaling needs are a few MB, not eight bytes for every pixel of the image.
_STRIPE_PIXELS = 1 << 20


def _stripes(im: PILImage.Image, multiple: int = 1) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, array) for stripes of about _STRIPE_PIXELS pixels, top to bottom; each stripe but
    the last has a multiple of `multiple` rows."""
    w, h = im.size
    rows = multiple * max(1, _STRIPE_PIXELS // max(w * multiple, 1))
    for top in range(0, h, rows):
        yield top, np.asarray(im.crop((0, top, w, min(h, top + rows))))


def _grey_scale(im: PILImage.Image) -> Callable[[np.ndarray], np.ndarray]:
    """The 16/32-bit grey values of `im` to 0..255, for its stripes: scaling the value range, as
    clipping would turn most pixels white. The range is the whole image's (one pass in stripes)."""
    lo, hi = 0.0, 65535.0  # unsigned 16-bit modes: in range whatever the pixels
    if not im.mode.startswith("I;16"):
        lo, hi = np.inf, -np.inf
        for _, a in _stripes(im):
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    if im.mode != "F" and lo >= 0 and hi <= 65535:
        # 16-bit data (I;16, I;16B, or the 32-bit "I" container some decoders use for it).
        # Scale the full 0..65535 range rather than stretching each image, so brightness
        # stays comparable between images. Looking up a table of the 65,536 values is a few
        # times faster than computing each pixel.
        table = np.rint(np.arange(65536) / 257.0).astype(np.uint8)

        def scale(a: np.ndarray) -> np.ndarray:
            return table[a]
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        def scale(a: np.ndarray) -> np.ndarray:
            return np.rint(a.astype(np.float64) * 255.0)
    else:
        def scale(a: np.ndarray) -> np.ndarray:
            return np.rint((a.astype(np.float64) - lo) * (255.0 / (hi - lo))) if hi > lo else np.zeros(a.shape)
    return scale


def _grey_to_uint8(im: PILImage.Image) -> PILImage.Image:
    """16/32-bit grey to 8-bit (`_grey_scale`), in stripes of rows into one 8-bit array: the only
    full-size allocation is the result, never a float copy of the whole image."""
    scale = _grey_scale(im)
    out = np.empty((im.height, im.width), np.uint8)
    for top, a in _stripes(im):
        out[top:top + len(a)] = scale(a)
    return PILImage.fromarray(out, "L")


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    """8-bit RGB of a loaded image. The caller's image is left as it was (and may be closed after)."""
    if im.mode.startswith("I") or im.mode == "F":
        grey = _grey_to_uint8(im)
        return grey.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent areas become white (empty slide), not black (dense tissue). Pasting through
        # the alpha band gives alpha_composite's values without its three full-size copies.
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        out = PILImage.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    if im.mode == "RGB":
        return im
    return im.convert("RGB")  # L, P, 1, CMYK, YCbCr


def _reduced_rgb(im: PILImage.Image, factor: int) -> PILImage.Image:
    """8-bit RGB of a loaded image, each `factor` x `factor` block of pixels averaged into one.

    Converted and reduced a stripe of rows at a time (stripes of whole blocks, so the result is the
    reduction of the whole converted image): beside the decoded frame, no full-size copy is made,
    neither RGB (4 bytes a pixel) nor, for 16/32-bit images, 8-bit grey.
    """
    w, h = im.size
    out = PILImage.new("RGB", (-(-w // factor), -(-h // factor)))
    if im.mode.startswith("I") or im.mode == "F":
        scale = _grey_scale(im)
        for top, a in _stripes(im, factor):
            grey = np.empty(a.shape, np.uint8)
            grey[...] = scale(a)
            out.paste(PILImage.fromarray(grey, "L").convert("RGB").reduce(factor), (0, top // factor))
        return out
    rows = factor * max(1, _STRIPE_PIXELS // (w * factor))
    for top in range(0, h, rows):
        stripe = im.crop((0, top, w, min(h, top + rows)))  # keeps the palette and transparency
        out.paste(_to_rgb(stripe).reduce(factor), (0, top // factor))
    return out


# The app's MAX_IMAGE_PIXELS, checked on the header before anything is decoded, is the only
# limit: PIL's own (about 179 MP) would refuse sizes an administrator allowed, with PIL's number.
PILImage.MAX_IMAGE_PIXELS = None


@contextmanager
def _opened(src: Path | BinaryIO, max_pixels: int | None, min_side: int | None) -> Iterator[PILImage.Image]:
    """The image, opened lazily (header only) and checked against the size limits; raises _BadImage."""
    try:
        im = PILImage.open(src, formats=PIL_FORMATS)
    except UnidentifiedImageError:
        raise _BadImage("not an image: no TIFF, PNG, JPEG or BMP data found") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types on malformed headers
        raise _BadImage(f"corrupt: {e}") from None
    with im:
        w, h = im.size
        # Checked before decoding: a tiny file can declare a 100,000 x 100,000 image, and the
        # decoded frame takes up to 4 bytes a pixel (PIL keeps RGB, 32-bit and 2-band modes so).
        if max_pixels is not None and w * h > max_pixels:
            raise _BadImage(f"too many pixels: {w}x{h} is more than {max_pixels:,} (MAX_IMAGE_PIXELS)")
        if min_side is not None and min(w, h) < min_side:
            raise _BadImage(f"too small: {w}x{h}, each side must be at least {min_side} px")
        yield im


def _load(im: PILImage.Image) -> None:
    """Decode every pixel (the full check of a file); raises _BadImage."""
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure means a damaged file
        raise _BadImage(f"corrupt: {e}") from None


def _rgb(im: PILImage.Image, factor: int = 1) -> PILImage.Image:
    try:
        return _to_rgb(im) if factor == 1 else _reduced_rgb(im, factor)
    except Exception as e:  # noqa: BLE001 - e.g. a mode PIL cannot convert
        raise _BadImage(f"corrupt: {e}") from None


# Images up to this size are decoded whole even where the caller could do with fewer pixels, so that
# ordinary images (the paper's 1388x1040, a camera's 12 MP) reach a model exactly as in training; only
# larger ones (whole-slide crops, or a few hundred kB of PNG that declare 100 MP) are reduced.
REDUCE_ABOVE_PIXELS = 16_000_000


def _reduction(size: tuple[int, int], reduce_to: int | None) -> int:
    """The whole factor an image of `size` is reduced by: 1 up to REDUCE_ABOVE_PIXELS, otherwise the
    largest that keeps its shorter side at least `reduce_to` (None: never reduced)."""
    w, h = size
    if reduce_to is None or w * h <= REDUCE_ABOVE_PIXELS:
        return 1
    return max(1, min(w, h) // max(reduce_to, 1))


def _give_back_memory() -> None:
    """Return the freed pages of a large decoded frame to the operating system. glibc keeps freed
    blocks of many MB in its heaps for reuse, so a server that decoded one huge image would stay that
    large; malloc_trim releases them. Elsewhere (no glibc) nothing is done."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _decode(
    src: Path | BinaryIO, max_pixels: int | None, min_side: int | None = None, reduce_to: int | None = None
) -> tuple[PILImage.Image, str, str]:
    """Open, check the header size, decode and convert to RGB; reduced (`_reduction`) where the
    image is larger than the caller needs: a JPEG by its decoder (draft mode: 1/2 to 1/8 of each
    side, decoded at that size), any image by averaging blocks of pixels as it is converted.

    Returns (rgb image, PIL format, original PIL mode); raises _BadImage with the reason. Peak
    memory is the decoded frame plus the RGB result, under 8 bytes per pixel of MAX_IMAGE_PIXELS;
    reduced, the frame plus a few MB.
    """
    with _opened(src, max_pixels, min_side) as im:
        fmt, mode, (w, h) = im.format or "", im.mode, im.size
        if fmt == "JPEG" and reduce_to is not None and _reduction(im.size, reduce_to) > 1:
            im.draft(None, (reduce_to, reduce_to))  # each side stays at least reduce_to
        _load(im)
        rgb = _rgb(im, _reduction(im.size, reduce_to))
    if w * h > REDUCE_ABOVE_PIXELS:
        del im  # the decoded frame, unless it is the result
        _give_back_memory()
    return rgb, fmt, mode


def load_rgb(path: Path | str | BinaryIO, max_pixels: int | None = None, *,
             reduce_to: int | None = None) -> PILImage.Image:
    """Decode a TIFF/PNG/JPEG/BMP file (any mode: RGBA, L, P, 1, 16-bit, CMYK...) to 8-bit RGB.

    Also accepts an open binary file (e.g. an upload). A file that is not a usable image raises
    UserError. Files not checked at ingest (uploads to predict, files named on the command line)
    must pass `max_pixels` (settings.max_image_pixels): without it no size is refused.
    `reduce_to`: the shorter side the caller needs; an image of more than REDUCE_ABOVE_PIXELS is
    then decoded reduced by a whole factor that keeps its shorter side at least that (None: whole).
    """
    if isinstance(path, str):
        path = Path(path)
    try:
        rgb, _, _ = _decode(path, max_pixels, reduce_to=reduce_to)
    except _BadImage as e:
        raise UserError(f"{_name(path)}: {e.reason}") from None
    return rgb


def image_size(path: Path | BinaryIO, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file's header, with the checks of `load_rgb` that need no pixel:
    UserError for a file that is not a TIFF/PNG/JPEG/BMP image or has more than `max_pixels`.
    An open file is left at its start."""
    try:
        with _opened(path, max_pixels, None) as im:
            return im.size
    except _BadImage as e:
        raise UserError(f"{_name(path)}: {e.reason}") from None
    finally:
        if not isinstance(path, Path):
            path.seek(0)


def _name(path: Path | BinaryIO) -> str:
    return path.name if isinstance(path, Path) else getattr(path, "name", "image")


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


def _is_junk(name: str) -> bool:
    # Files an operating system adds by itself (Finder's folder settings and resource forks, also
    # as ._NAME beside the file on other disks): not the user's, passed over without a word.
    return name in OS_JUNK or name.startswith("._")


def _entries(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not _is_junk(p.name)), key=lambda p: p.name)


def _leaves(path: Path, top: Path) -> bool:
    """Whether `path`, its links followed, lies outside the (resolved) folder being ingested."""
    return not path.resolve().is_relative_to(top)


def _dataset_root(root: Path, top: Path) -> Path:
    """Descend through wrapper folders: a root holding only one folder that itself holds
    folders but no images (`lymphoma/CLL/...`). A lone class folder is not descended into,
    nor a link that leaves `top` (the scan reports it)."""
    while True:
        entries = [p for p in _entries(root) if not p.name.startswith(".")]
        if len(entries) != 1 or _leaves(entries[0], top) or not entries[0].is_dir():
            return root
        inner = _entries(entries[0])
        has_dirs = any(p.is_dir() for p in inner)
        has_images = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in inner)
        if not has_dirs or has_images:
            return root
        root = entries[0]


def _text(name: str) -> str:
    """A file name as text the database can store: bytes that are not UTF-8 (a Latin-1 name from
    an old share, say) are written as escapes such as \\xe9."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _passed_over(entry: Path, rel: str, top: Path) -> tuple[str, str] | None:
    """(path shown, reason) for an entry not to be read at all; None for one to look at."""
    if _leaves(entry, top):
        # Only the link's own name: what it points to is none of the viewers' business.
        return rel, "link leaves the imported folder"
    if entry.name.startswith("."):
        return (rel + "/", "hidden folder") if entry.is_dir() else (rel, "hidden file")
    return None


def _scan(root: Path, top: Path) -> tuple[list[str], list[_Candidate], list[tuple[str, str]]]:
    """Class folder names, the files directly inside them, and what was passed over. Links are
    followed only while they stay inside `top`, so an allowed folder cannot lead elsewhere."""
    classes: list[str] = []
    candidates: list[_Candidate] = []
    skipped: list[tuple[str, str]] = []
    for entry in _entries(root):
        label = _text(entry.name)
        if (passed := _passed_over(entry, label, top)) is not None:
            skipped.append(passed)
            continue
        if entry.is_file():
            skipped.append((label, "not in a class folder"))
            continue
        if not entry.is_dir():
            continue
        classes.append(label)
        for f in _entries(entry):
            rel = f"{label}/{_text(f.name)}"
            if (passed := _passed_over(f, rel, top)) is not None:
                skipped.append(passed)
            elif f.is_dir():
                # E.g. Augmentor's output/ folder: taking it would put augmented copies of
                # test images into training.
                skipped.append(
                    (rel + "/", "sub-folder skipped: only files directly inside a class folder are taken")
                )
            elif f.is_file():
                candidates.append(_Candidate(f.resolve(), rel, label))
    return classes, candidates, skipped


def _validate(cand: _Candidate, settings: Settings) -> _Valid:
    if cand.path.stat().st_size == 0:
        raise _BadImage("empty file")
    ext = cand.path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise _BadImage(f"not an image: unsupported file type '{ext or cand.path.name}'")
    with _opened(cand.path, settings.max_image_pixels, settings.min_image_side) as im:
        fmt, mode, (width, height) = im.format or "", im.mode, im.size
        _load(im)
        # Every later use converts to RGB; one pixel shows the mode allows it, without the
        # memory of a full-size copy.
        _rgb(im.crop((0, 0, 1, 1)))
    with open(cand.path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return _Valid(cand, sha, fmt, mode, width, height)


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


def _zip_parts(info: zipfile.ZipInfo) -> list[str]:
    # Some Windows tools write "\\" as the separator; read it as "/".
    return [p for p in re.split(r"[/\\]", info.filename) if p not in ("", ".")]


def _zip_members(zf: zipfile.ZipFile, name: str, settings: Settings) -> tuple[list[zipfile.ZipInfo], list[zipfile.ZipInfo]]:
    """The (files, folders) to unpack, checked from the zip's directory before anything is written."""
    infos = zf.infolist()
    # Refuse the whole archive: a crafted entry says the archive is not to be trusted.
    for info in infos:
        reason = _unsafe_entry_reason(info)
        if reason:
            raise UserError(f"Refusing {name}: entry '{info.filename}' ({reason}) could write "
                            "outside the extraction folder. Nothing was ingested.")
    infos = [i for i in infos if not any(_is_junk(p) for p in _zip_parts(i))]
    files = [i for i in infos if not i.filename.replace("\\", "/").endswith("/")]
    folders = [i for i in infos if i.filename.replace("\\", "/").endswith("/")]
    seen: set[tuple[str, ...]] = set()
    for info in files:
        # Which of two same-named entries wins depends on the unpacking tool.
        parts = tuple(_zip_parts(info))
        if parts in seen:
            raise UserError(f"Refusing {name}: it has two entries named '{info.filename}'. Nothing was ingested.")
        seen.add(parts)
    if not files:
        raise UserError(f"{name} is empty.")
    encrypted = [i.filename for i in files if i.flag_bits & 0x1]
    if encrypted:
        raise UserError(f"{name} is password-protected (e.g. '{encrypted[0]}').")
    check_zip(settings, name, len(infos), sum(i.file_size for i in files))
    for info in files:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_FREE_BYTES and ratio > MAX_ZIP_RATIO:
            raise UserError(
                f"Refusing {name}: entry '{info.filename}' would unpack from {info.compress_size:,} to "
                f"{info.file_size:,} bytes ({ratio:,.0f} times), more than the {MAX_ZIP_RATIO} times that "
                "real images compress; it looks like a zip bomb. Nothing was ingested."
            )
    return files, folders


def _check_room(settings: Settings, name: str, dest: Path, total: int) -> None:
    """Room for `total` unpacked bytes: within MAX_DISK_GB and on the disk itself."""
    check_disk(settings, total, f"unpacking {name}")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise UserError(f"Not enough disk space to unpack {name}: it needs {total / 1e9:,.2f} GB and "
                        f"{free / 1e9:,.2f} GB are free. Nothing was ingested.")


def _unpack(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, name: str) -> None:
    """Copy one entry, counting the bytes really written: a header that understates an entry's
    size must not get more onto the disk than the checks above allowed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, open(target, "wb") as out:
        while chunk := src.read(1024 * 1024):
            written += len(chunk)
            if written > info.file_size:
                raise UserError(f"Refusing {name}: entry '{info.filename}' holds more than the {info.file_size:,} "
                                "bytes its header declares; the zip is damaged or crafted. Nothing was ingested.")
            out.write(chunk)


def _extract_zip(zip_path: Path, dest: Path, settings: Settings) -> None:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            files, folders = _zip_members(zf, zip_path.name, settings)
            _check_room(settings, zip_path.name, dest, sum(i.file_size for i in files))
            for info in folders:  # an empty class folder is reported, as in a folder source
                dest.joinpath(*_zip_parts(info)).mkdir(parents=True, exist_ok=True)
            for info in files:
                _unpack(zf, info, dest.joinpath(*_zip_parts(info)), zip_path.name)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # zlib, EOF: damaged compressed data
        raise UserError(f"{zip_path.name} is damaged: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"{zip_path.name} is damaged: an entry name marked as UTF-8 is not UTF-8.") from None
    except NotImplementedError as e:  # e.g. Deflate64 from Windows Explorer
        raise UserError(f"{zip_path.name} uses an unsupported compression method: {e}") from None
    except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        raise UserError(f"{zip_path.name} has a file and a folder with the same name: "
                        f"{_inside(e.filename, dest)}.") from None
    except OSError as e:  # e.g. an entry name too long for the file system
        if is_disk_full(e):
            raise  # reported as a full disk, like any other write of the ingest
        raise UserError(f"{zip_path.name} could not be unpacked: {e.strerror or 'error ' + str(e.errno)}.") from None


def _inside(path: object, root: Path) -> str:
    """`path` as it is inside `root` (e.g. "CLL/001.png"): a message names a file as it is in its
    zip or folder, never by the server folder it was unpacked into."""
    try:
        return Path(str(path)).relative_to(root).as_posix()
    except ValueError:
        return Path(str(path)).name


@contextmanager
def _source_folder(source: Path, settings: Settings) -> Iterator[Path]:
    """The source as a folder; a zip is unpacked into a temp folder that is removed afterwards."""
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise UserError(f"Source not found: {source.name}")
    if not zipfile.is_zipfile(source):
        raise UserError(
            f"{source.name} is not a zip file (or it is damaged). Give a folder of class "
            "sub-folders, or a .zip of one."
        )
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ingest-", dir=settings.tmp_dir))
    try:
        _extract_zip(source, tmp, settings)
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


# ---------------------------------------------------------------------------------------------
# Storage


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
    than MAX_IMAGES_PER_DATASET, storage above MAX_DISK_GB, a zip over MAX_UNPACKED_MB or
    MAX_ZIP_ENTRIES, names too long to store) raises UserError before anything is stored; so does a
    full disk, after removing what this call stored. Rows are added and flushed; the caller commits.
    """
    if user is not None:
        require_editor(user, "add images")
        check_name_length(user.name, "User name")
    name = check_name_length(name.strip(), "Dataset name")
    if not name:
        raise UserError("Give the dataset a name.")
    if groups_csv is not None and group_pattern:
        raise UserError("Give either a groups CSV or a group pattern, not both.")
    group_rx = _compile_group_pattern(group_pattern) if group_pattern else None

    source = Path(source).expanduser()
    check_disk(settings)  # before unpacking or decoding anything
    hold_ingest_lock(session, settings)  # until commit: files stored before their rows are visible
    stored: list[Path] = []  # files this call adds to the store
    try:
        with disk_full_is_user_error(settings, f"the images of dataset '{name}'"), \
                _source_folder(source, settings) as folder:
            return _ingest_folder(
                session, settings, folder, source, name, groups_csv, group_rx, progress, user, stored
            )
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
    progress: Callable[[int, int], None] | None,
    user: User | None,
    stored: list[Path],
) -> IngestReport:
    top = folder.resolve()
    folders, candidates, skipped = _scan(_dataset_root(folder, top), top)
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
        except _BadImage as e:
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
        dataset = Dataset(name=name, classes=classes, source=str(source.resolve()),
                          created_by=user.name if user is not None else None)
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


def _deduplicate(session: Session, dataset: Dataset | None, name: str, valid: list[_Valid]
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
    return unique, duplicates, existing


def _classes(dataset: Dataset | None, name: str, source: Path, folders: list[str], new_counts: Counter[str],
             skipped: list[tuple[str, str]]) -> list[str]:
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
        groups = _groups_from_csv(groups_csv, rels)
    elif group_rx is not None:
        groups = _groups_from_pattern(group_rx, rels)
    for group in set(groups.values()) if groups else ():
        check_name_length(group, "Group")
    return groups


def _add_images(settings: Settings, dataset: Dataset, unique: list[_Valid], existing: dict[str, Image],
                groups: dict[str, str] | None, stored: list[Path]) -> tuple[int, int]:
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


def lock_dataset(session: Session, dataset: Dataset) -> Dataset:
    """Read `dataset` again under a lock held until the session's transaction ends, so that
    launching runs on it and deleting it take turns. UserError when it has been deleted meanwhile.

    PostgreSQL locks the row (SELECT ... FOR UPDATE). SQLite has no row locks: a write that changes
    nothing takes the database's one write lock, which a transaction keeps to its end.
    """
    name = dataset.name
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Dataset).where(Dataset.id == dataset.id).values(name=Dataset.name)
                        .execution_options(synchronize_session=False))
    locked = session.scalar(select(Dataset).where(Dataset.id == dataset.id).with_for_update()
                            .execution_options(populate_existing=True))
    if locked is None:
        raise UserError(f"Dataset '{name}' was deleted.")
    return locked


def delete_dataset(session: Session, settings: Settings, name: str, *, user: User | None = None) -> None:
    """Delete the dataset's rows (images, skipped files, and by cascade its splits and runs).
    `user` (when given) must be an editor.

    Stored files that no other dataset uses are removed once the caller's transaction commits,
    so a rollback never leaves rows pointing at missing files. Which files are unused is decided,
    and they are removed, under the ingest lock held alone: an ingest running meanwhile may have
    found one of them stored and be about to reference it, so the delete waits for it to commit.
    """
    if user is not None:
        require_editor(user, "delete datasets")
    dataset = get_dataset(session, name)
    hold_ingest_lock(session, settings, exclusive=True)  # before any database lock, as ingest takes them
    dataset = lock_dataset(session, dataset)
    active = session.scalar(
        select(func.count())
        .select_from(Run)
        .where(Run.dataset_id == dataset.id, Run.status.in_([RunStatus.queued, RunStatus.running]))
    )
    if active:
        raise UserError(f"Dataset '{name}' has {active} queued or running run(s); cancel them first.")

    stored = dict(session.execute(select(Image.sha256, Image.stored_path).where(Image.dataset_id == dataset.id)).all())
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
