"""Limits an administrator sets (core/config.py: MAX_UPLOAD_MB, MAX_IMAGES_PER_DATASET,
MAX_QUEUED_RUNS, MAX_QUEUED_RUNS_PER_USER, MAX_DISK_GB, MAX_UNPACKED_MB, MAX_ZIP_ENTRIES), checked
before anything is written; each refusal is a UserError that names the setting. A limit of 0 (or
less) means no limit. Also the limits no setting changes: the length of names (the database's
columns), and a full disk, which is reported to the user like any other limit.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.exc import OperationalError

from core.config import Settings
from core.errors import UserError
from core.store.db import NAME_LENGTH

MB = 1024**2  # Streamlit's server.maxUploadSize counts MB this way
GB = 1000**3


def content_size(content: bytes | BinaryIO) -> int:
    """Size in bytes of an upload: bytes, a Streamlit UploadedFile, or any seekable binary file."""
    if isinstance(content, (bytes, bytearray, memoryview)):
        return len(content)
    size = getattr(content, "size", None)
    if isinstance(size, int):
        return size
    pos = content.tell()
    try:
        return content.seek(0, os.SEEK_END)
    finally:
        content.seek(pos)


def check_upload_size(settings: Settings, contents: Iterable[bytes | BinaryIO]) -> int:
    """UserError when the uploads together are larger than MAX_UPLOAD_MB; returns their size."""
    total = sum(content_size(c) for c in contents)
    limit = settings.max_upload_mb
    if limit > 0 and total > limit * MB:
        raise UserError(
            f"The upload is {total / MB:,.1f} MB, more than the MAX_UPLOAD_MB limit of {limit:g} MB. "
            "Upload it in smaller parts (each can go into the same dataset name), or ask an "
            "administrator to import it from a folder on the server. Nothing was ingested."
        )
    return total


def disk_usage(settings: Settings) -> int:
    """Bytes used by files under APP_HOME, APP_HOME/tmp (uploads being unpacked) included."""
    total = 0
    stack = [os.fspath(settings.app_home)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:  # removed while we looked
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total


def check_disk(settings: Settings, adding: int = 0, what: str = "") -> None:
    """UserError when files under APP_HOME use more than MAX_DISK_GB, or would with `adding` bytes."""
    limit = settings.max_disk_gb
    if limit <= 0:
        return
    used = disk_usage(settings)
    if used + adding <= limit * GB:
        return
    if adding and used <= limit * GB:
        usage = f"uses {used / GB:,.2f} GB and {what or 'this'} would add {adding / GB:,.2f} GB"
    else:
        usage = f"uses {used / GB:,.2f} GB"
    raise UserError(
        f"The app's storage (APP_HOME) {usage}, more than the MAX_DISK_GB limit of "
        f"{limit:g} GB. Delete datasets or runs that are no longer needed, or ask an administrator "
        "to raise MAX_DISK_GB. Nothing was stored."
    )


def check_dataset_size(settings: Settings, name: str, has: int, offered: int) -> None:
    """UserError when a dataset holding `has` images would exceed MAX_IMAGES_PER_DATASET with `offered` more."""
    limit = settings.max_images_per_dataset
    if limit > 0 and has + offered > limit:
        raise UserError(
            f"Dataset '{name}' has {has:,} image(s) and {offered:,} new one(s) were offered: "
            f"{has + offered:,} is more than the MAX_IMAGES_PER_DATASET limit of {limit:,}. "
            "Ingest fewer images, or split them over several datasets. Nothing was ingested."
        )


def check_queue(settings: Settings, queued: int, adding: int) -> None:
    """UserError when `queued` runs plus `adding` new ones would exceed MAX_QUEUED_RUNS."""
    limit = settings.max_queued_runs
    if limit > 0 and queued + adding > limit:
        raise UserError(
            f"{queued} run(s) are already queued and this adds {adding}: more than the MAX_QUEUED_RUNS "
            f"limit of {limit}. Wait for queued runs to finish, or cancel some, then try again. "
            "No run was created."
        )


def check_user_queue(settings: Settings, user: str, queued: int, adding: int) -> None:
    """UserError when `user`'s `queued` runs plus `adding` new ones would exceed MAX_QUEUED_RUNS_PER_USER."""
    limit = settings.max_queued_runs_per_user
    if limit > 0 and queued + adding > limit:
        raise UserError(
            f"You ({user}) already have {queued} run(s) queued and this adds {adding}: more than the "
            f"MAX_QUEUED_RUNS_PER_USER limit of {limit} queued runs per person, which keeps the worker "
            "shared. Wait for your queued runs to start, or cancel some, then try again. No run was created."
        )


def check_zip(settings: Settings, name: str, entries: int, unpacked: int) -> None:
    """UserError when a zip holds more than MAX_ZIP_ENTRIES entries or unpacks to more than MAX_UNPACKED_MB."""
    limit = settings.max_zip_entries
    if limit > 0 and entries > limit:
        raise UserError(
            f"{name} holds {entries:,} files and folders, more than the MAX_ZIP_ENTRIES limit of {limit:,}. "
            "Split it into smaller zips (each can go into the same dataset name). Nothing was ingested."
        )
    check_unpacked(settings, name, unpacked)


def check_unpacked(settings: Settings, name: str, unpacked: int) -> None:
    """UserError when `unpacked` bytes of zip `name` are more than MAX_UNPACKED_MB."""
    limit = settings.max_unpacked_mb
    if limit > 0 and unpacked > limit * MB:
        raise UserError(
            f"{name} unpacks to {unpacked / MB:,.1f} MB or more, more than the MAX_UNPACKED_MB limit of "
            f"{limit:g} MB. Split it into smaller zips, or ask an administrator to import it from a folder "
            "on the server. Nothing was ingested."
        )


def check_name_length(value: str, what: str) -> str:
    """`value`, or UserError when it is longer than the database stores (NAME_LENGTH characters) or
    holds a NUL character (which PostgreSQL cannot store in text)."""
    check_text(value, what)
    if len(value) > NAME_LENGTH:
        raise UserError(
            f"{what} '{value[:60]}...' is {len(value)} characters long; names can be at most "
            f"{NAME_LENGTH} characters. Choose a shorter one."
        )
    return value


def check_text(value: str, what: str) -> str:
    """`value`, or UserError when it holds a NUL character: PostgreSQL refuses one in text, and no
    name or note a person types has one."""
    if "\x00" in value:
        raise UserError(f"{what} holds a NUL character (\\x00), which cannot be stored; remove it.")
    return value


# How Rust writes an OS error into a message, e.g. safetensors' "Error while serializing: I/O error:
# No space left on device (os error 28)": its SafetensorError carries no errno of its own.
_NATIVE_DISK_FULL = re.compile(rf"\(os error ({errno.ENOSPC}|{errno.EDQUOT})\)")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or the user's quota) is full: an OSError, SQLite's own words, or
    an error from native code (safetensors) that quotes the OS error."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, OperationalError):
        return "database or disk is full" in str(exc.orig)
    # A UserError's text may quote a name from outside, which could spell anything.
    return not isinstance(exc, UserError) and bool(_NATIVE_DISK_FULL.search(str(exc)))


def disk_full_error(what: str, folder: Path, *, then: str = "", page: str = "") -> UserError:
    """The UserError of a full disk: `what` could not be stored, the space left where it was to go
    (`folder`, not named: a user has no business with the server's folders), and what to do, `then`
    (the command line's words; `page` the pages' words, where they differ)."""
    then = then or (
        "Nothing was stored. Delete datasets or runs that are no longer needed, or ask an administrator to free space."
    )
    head = f"The disk is full: {what} could not be stored ({_free_text(folder)})."
    return UserError(f"{head} {then}", page=f"{head} {page}" if page else None)


@contextmanager
def disk_full_is_user_error(settings: Settings, what: str) -> Iterator[None]:
    """Turn a full disk inside the block into a UserError: the administrator can free space, the
    user can try a smaller upload; a traceback helps neither. Partial files are the block's to remove."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(what, settings.app_home) from None


def _free_text(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / GB:,.2f} GB free"
    except OSError:
        return "free space unknown"
