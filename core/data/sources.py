"""Where a dataset's images come from: a folder of class sub-folders, or a .zip of one.

Expected layout, as in the paper's IICBU-2008 lymphoma set::

    root/CLL/001.tif
    root/FL/002.tif
    root/MCL/003.tif

A zip (or folder) whose content sits inside one wrapper folder (`lymphoma/CLL/...`) is accepted
(`dataset_root`). `scan` lists the files to check, each with its label, and what is not read with its
reason: hidden files and folders (not the operating system's own, such as __MACOSX/ and .DS_Store,
passed over silently), and links that lead out of the folder being ingested, shown by their own
name only. A zip is checked from its directory before anything is unpacked (MAX_ZIP_ENTRIES,
MAX_UNPACKED_MB, MAX_DISK_GB, compression ratio), then unpacked into a temporary folder
(`source_folder`).

Apart from ingest (core/data/ingest.py), which checks and stores what is found here, so that a new
kind of source hands ingest its files without touching the checks. Which server folders the web app
may import from (IMPORT_ROOTS) is decided before, in core/data/uploads.py.
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.access.limits import check_disk, check_zip, is_disk_full
from core.config import Settings
from core.data.decoding import IMAGE_EXTENSIONS
from core.errors import UserError

OS_JUNK = {"__MACOSX", ".DS_Store"}  # and ._NAME files: passed over silently (_is_junk)
# An entry that unpacks to more than MAX_ZIP_RATIO times its compressed size is no microscopy
# image (those compress 1 to 3 times) but a zip bomb; entries up to RATIO_FREE_BYTES (a blank
# mask, a text file) may compress as well as they like.
MAX_ZIP_RATIO = 100
RATIO_FREE_BYTES = 1024**2


@dataclass
class Candidate:
    path: Path  # on disk
    rel: str  # inside the dataset root, e.g. "CLL/001.tif"
    label: str


def _is_junk(name: str) -> bool:
    # Files an operating system adds by itself (Finder's folder settings and resource forks, also
    # as ._NAME beside the file on other disks): not the user's, passed over without a word.
    return name in OS_JUNK or name.startswith("._")


def _entries(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not _is_junk(p.name)), key=lambda p: p.name)


def _leaves(path: Path, top: Path) -> bool:
    """Whether `path`, its links followed, lies outside the (resolved) folder being ingested."""
    return not path.resolve().is_relative_to(top)


def dataset_root(root: Path, top: Path) -> Path:
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


def scan(root: Path, top: Path) -> tuple[list[str], list[Candidate], list[tuple[str, str]]]:
    """Class folder names, the files directly inside them, and what was passed over. Links are
    followed only while they stay inside `top`, so an allowed folder cannot lead elsewhere."""
    classes: list[str] = []
    candidates: list[Candidate] = []
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
                skipped.append((rel + "/", "sub-folder skipped: only files directly inside a class folder are taken"))
            elif f.is_file():
                candidates.append(Candidate(f.resolve(), rel, label))
    return classes, candidates, skipped


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


def _zip_members(
    zf: zipfile.ZipFile, name: str, settings: Settings
) -> tuple[list[zipfile.ZipInfo], list[zipfile.ZipInfo]]:
    """The (files, folders) to unpack, checked from the zip's directory before anything is written."""
    infos = zf.infolist()
    # Refuse the whole archive: a crafted entry says the archive is not to be trusted.
    for info in infos:
        reason = _unsafe_entry_reason(info)
        if reason:
            raise UserError(
                f"Refusing {name}: entry '{info.filename}' ({reason}) could write "
                "outside the extraction folder. Nothing was ingested."
            )
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
        raise UserError(
            f"Not enough disk space to unpack {name}: it needs {total / 1e9:,.2f} GB and "
            f"{free / 1e9:,.2f} GB are free. Nothing was ingested."
        )


def _unpack(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, name: str) -> None:
    """Copy one entry, counting the bytes really written: a header that understates an entry's
    size must not get more onto the disk than the checks above allowed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, open(target, "wb") as out:
        while chunk := src.read(1024 * 1024):
            written += len(chunk)
            if written > info.file_size:
                raise UserError(
                    f"Refusing {name}: entry '{info.filename}' holds more than the {info.file_size:,} "
                    "bytes its header declares; the zip is damaged or crafted. Nothing was ingested."
                )
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
        raise UserError(
            f"{zip_path.name} has a file and a folder with the same name: {_inside(e.filename, dest)}."
        ) from None
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
def source_folder(source: Path, settings: Settings) -> Iterator[Path]:
    """The source as a folder; a zip is unpacked into a temp folder that is removed afterwards."""
    if source.is_dir():
        yield source
        return
    if not source.is_file():
        raise UserError(f"Source not found: {source.name}")
    if not zipfile.is_zipfile(source):
        raise UserError(
            f"{source.name} is not a zip file (or it is damaged). Give a folder of class sub-folders, or a .zip of one."
        )
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ingest-", dir=settings.tmp_dir))
    try:
        _extract_zip(source, tmp, settings)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
