"""Files under APP_HOME: atomic writes, and the lock that keeps clean-up away from a running ingest.

Every file the app keeps (stored images, checkpoints) is written to a temporary file in the target's
own folder, flushed to disk, and renamed over the target with os.replace. A reader, or a process
that starts after a crash (kill -9, power loss), sees either the old file or the complete new one,
never half of one. What a crash can leave is a temporary file named `.tmp-*` beside its target;
`is_temp_name` recognises those, and `python -m core check --fix` removes them.

Ingest stores files first and commits their rows afterwards, so for a while its files have no rows.
It holds a shared lock (APP_HOME/ingest.lock) from its first write until its transaction ends; the
clean-up of unreferenced files, and deleting a dataset, take the lock exclusively, so neither
deletes a file that a running ingest is about to reference. The kernel drops the lock of a killed
process.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: no locking; clean-up then relies on the app being stopped
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from core.config import Settings

TEMP_PREFIX = ".tmp-"
# Earlier versions named checkpoint and cache temp files tempfile's way (tmpXXXXXXXX.tmp).
_LEGACY_TEMP = re.compile(r"^tmp[\w-]{6,}\.tmp$")
# Stored images are world-readable, like files written without mkstemp's private 0600.
FILE_MODE = 0o644
LOCK_NAME = "ingest.lock"


def is_temp_name(name: str) -> bool:
    """Whether a file name is that of an atomic write's temporary file."""
    return name.startswith(TEMP_PREFIX) or bool(_LEGACY_TEMP.match(name))


def _fsync_dir(folder: Path) -> None:
    # The rename itself must reach the disk too, or after a power loss the folder may still
    # list the old file (or none). Some file systems refuse fsync on a folder; they order
    # renames themselves.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside `target` to write to; on a clean exit it replaces `target`.

    If the block raises, the temporary file is removed and `target` is left as it was. With
    `fsync` the data and the rename are on disk when the block returns (off for scratch files
    that a crash may lose).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(target.parent)


def write_bytes_atomic(
    target: Path, content: bytes | bytearray | memoryview | BinaryIO | IO[bytes], *, fsync: bool = True
) -> None:
    """Write bytes, or the whole of a binary file object (from its start), to `target` atomically."""
    with atomic_path(target, fsync=fsync) as tmp, open(tmp, "wb") as out:
        if isinstance(content, (bytes, bytearray, memoryview)):
            out.write(content)
        else:
            if hasattr(content, "seek"):
                content.seek(0)
            shutil.copyfileobj(content, out, 1024 * 1024)


def copy_file_atomic(source: Path, target: Path, *, fsync: bool = True) -> None:
    """Copy `source` to `target` atomically (its bytes only, not its permissions or times)."""
    with open(source, "rb") as inp:
        write_bytes_atomic(target, inp, fsync=fsync)


# ---------------------------------------------------------------------------------------------
# The ingest lock


def _open_lock(settings: Settings) -> IO[bytes]:
    settings.app_home.mkdir(parents=True, exist_ok=True)
    return open(settings.app_home / LOCK_NAME, "ab")


def hold_ingest_lock(session: Session, settings: Settings, *, exclusive: bool = False) -> None:
    """Share the ingest lock until `session`'s current transaction ends (commit or rollback).

    Call before writing any file that a row of this transaction will reference. Several ingests
    share the lock; only clean-up (`exclusive_ingest_lock`) excludes them, briefly. With
    `exclusive` (deleting a dataset, whose files another ingest may be about to reference), wait
    for running ingests to end and keep new ones out until the transaction ends.
    """
    if fcntl is None:
        return
    held = session.info.get("ingest_lock")
    if held is not None:
        if exclusive:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        return
    lock = _open_lock(settings)
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)  # waits while a clean-up runs
    session.info["ingest_lock"] = lock

    def release(sess: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None and sess.info.get("ingest_lock") is lock:
            del sess.info["ingest_lock"]
            lock.close()  # closing the file drops the lock

    event.listen(session, "after_transaction_end", release)


def remove_unless_shared(session: Session, paths: list[Path]) -> None:
    """Remove stored files whose rows `session` will not commit (its ingest failed), unless another
    ingest shares the lock: that one may have found a file present and be about to reference it.
    Files left then are removed later by `python -m core check --fix`."""
    if not paths:
        return
    lock = session.info.get("ingest_lock")
    if fcntl is not None and lock is not None:
        try:  # held exclusively until the transaction ends, which drops the lock as usual
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
    for path in paths:
        path.unlink(missing_ok=True)


@contextmanager
def exclusive_ingest_lock(settings: Settings) -> Iterator[bool]:
    """Take the ingest lock exclusively if no ingest holds it; yields whether it was taken."""
    if fcntl is None:
        yield True
        return
    with _open_lock(settings) as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True  # released when the file closes
