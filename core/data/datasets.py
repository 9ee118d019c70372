"""Datasets as a whole: find one by name, list them, lock one while runs are launched on it, delete
one with the stored files no other dataset uses, and where a stored image lies.

Images are added by core/data/ingest.py (files from core/data/sources.py, decoded by
core/data/decoding.py); the functions here only read and remove what ingest made, so the many
modules that need a dataset import them without the ingest machinery.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.config import Settings
from core.errors import UserError
from core.store.db import Dataset, Image, Run, RunStatus
from core.store.files import hold_ingest_lock


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
        session.execute(
            update(Dataset)
            .where(Dataset.id == dataset.id)
            .values(name=Dataset.name)
            .execution_options(synchronize_session=False)
        )
    locked = session.scalar(
        select(Dataset).where(Dataset.id == dataset.id).with_for_update().execution_options(populate_existing=True)
    )
    if locked is None:
        raise UserError(f"Dataset '{name}' was deleted.")
    return locked


def delete_dataset(session: Session, settings: Settings, name: str, *, user: User) -> None:
    """Delete the dataset's rows (images, skipped files, and by cascade its splits and runs).
    `user` must be an editor.

    Stored files that no other dataset uses are removed once the caller's transaction commits,
    so a rollback never leaves rows pointing at missing files. Which files are unused is decided,
    and they are removed, under the ingest lock held alone: an ingest running meanwhile may have
    found one of them stored and be about to reference it, so the delete waits for it to commit.
    """
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


def image_path(settings: Settings, image: Image) -> Path:
    """Absolute path of a stored image."""
    return settings.app_home / image.stored_path
