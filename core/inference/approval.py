"""Which model is approved for use: one run per class set, chosen by an editor, with its history.

Front ends that classify without naming a run (the Predict page's default, the API, `python -m core
predict` without --run) use the approved model of the images' class set (core/inference/service.py).
An approval names the run and the sha256 of its model file as it was approved. Approving another
run of the same class set ends the previous approval (withdrawn by the new approver, `replaced_by`
the new one); withdrawing leaves the class set with none, never silently with an older one. Rows
are never deleted: the history is all of them (core/store/db.py::ModelApproval).

No torch: the Runs page lists approvals. The model file is checked by reading its header only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.access.accounts import User, require_editor
from core.access.limits import check_name_length
from core.config import Settings
from core.errors import UserError
from core.store.db import ModelApproval, Run, RunStatus, utcnow
from core.store.runs import MODEL_META_KEY, get_run, model_file_problem, model_path

SEPARATOR = "/"  # class names are folder names, which cannot hold one
MAX_NOTE = 2000  # characters


@dataclass(frozen=True)
class ApprovalRecord:
    """One approval, current or past."""

    id: int
    classes: tuple[str, ...]  # sorted
    run_id: int | None  # None: the run has been deleted since
    run_label: str  # the run as it was named when approved, e.g. "run 3 · lymphoma"
    model_sha256: str
    note: str
    approved_by: str
    approved_at: datetime
    withdrawn_by: str | None
    withdrawn_at: datetime | None
    replaced_by: int | None  # the approval that ended this one, when one did
    current: bool  # the class set's approval now

    @property
    def class_set(self) -> str:
        return class_set_key(self.classes)

    @property
    def state(self) -> str:
        """'approved', 'replaced' or 'withdrawn', as the history shows it."""
        if self.current:
            return "approved"
        return "replaced" if self.replaced_by is not None else "withdrawn"


def class_set_key(classes: Sequence[str]) -> str:
    """The key of a class set: its sorted names joined by SEPARATOR."""
    return SEPARATOR.join(sorted(classes))


def _record(row: ModelApproval, current: bool) -> ApprovalRecord:
    return ApprovalRecord(
        id=row.id,
        classes=tuple(row.class_set.split(SEPARATOR)),
        run_id=row.run_id,
        run_label=row.run_label,
        model_sha256=row.model_sha256,
        note=row.note,
        approved_by=row.approved_by,
        approved_at=row.approved_at,
        withdrawn_by=row.withdrawn_by,
        withdrawn_at=row.withdrawn_at,
        replaced_by=row.replaced_by,
        current=current,
    )


def _current_rows(session: Session, class_set: str | None = None) -> list[ModelApproval]:
    """The approval in force of each class set (of `class_set` only, when given), newest first."""
    query = select(ModelApproval).where(ModelApproval.withdrawn_at.is_(None)).order_by(ModelApproval.id.desc())
    if class_set is not None:
        query = query.where(ModelApproval.class_set == class_set)
    latest: dict[str, ModelApproval] = {}
    for row in session.scalars(query):
        latest.setdefault(row.class_set, row)  # two approvals at once leave two open rows: the latest wins
    return list(latest.values())


def approved_run(session: Session, classes: Sequence[str] | None = None) -> ApprovalRecord | None:
    """The approval in force for `classes` (any order); with None, the most recently approved of
    any class set. None when there is none."""
    rows = _current_rows(session, None if classes is None else class_set_key(classes))
    return _record(rows[0], True) if rows else None


def current_approvals(session: Session) -> list[ApprovalRecord]:
    """The approval in force of each class set, newest first."""
    return [_record(row, True) for row in _current_rows(session)]


def approval_history(session: Session) -> list[ApprovalRecord]:
    """Every approval ever made, newest first, each saying whether it is in force."""
    current = {row.id for row in _current_rows(session)}
    rows = session.scalars(select(ModelApproval).order_by(ModelApproval.id.desc()))
    return [_record(row, row.id in current) for row in rows]


def approve(session: Session, settings: Settings, run_id: int, user: User, note: str = "") -> ApprovalRecord:
    """Approve run `run_id`'s model for its class set, ending the class set's previous approval.

    Editors only; the run must have succeeded and have its own, whole model file. UserError
    otherwise, with nothing recorded."""
    require_editor(user, "approve models")
    check_name_length(user.name, "User name")
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise UserError(f"An approval's note is limited to {MAX_NOTE} characters; this one has {len(note)}.")
    run = get_run(session, run_id)
    classes, sha = _usable_model(settings, run)
    key = class_set_key(classes)
    now = utcnow()
    previous = _current_rows(session, key)
    if any(row.run_id == run_id and row.model_sha256 == sha for row in previous):
        raise UserError(f"Run {run_id} is already the approved model for {', '.join(classes)}.")
    row = ModelApproval(
        class_set=key,
        run_id=run_id,
        run_label=_run_label(run),
        model_sha256=sha,
        note=note,
        approved_by=user.name,
        approved_at=now,
    )
    session.add(row)
    session.flush()
    for old in previous:
        old.withdrawn_by, old.withdrawn_at, old.replaced_by = user.name, now, row.id
    session.flush()
    return _record(row, True)


def withdraw(session: Session, run_id: int, user: User) -> ApprovalRecord:
    """End run `run_id`'s approval: its class set then has no approved model until an editor
    approves one. Editors only; UserError when the run is not the approved model of its class set."""
    require_editor(user, "withdraw approvals")
    check_name_length(user.name, "User name")
    rows = [row for row in _current_rows(session) if row.run_id == run_id]
    if not rows:
        raise UserError(
            f"Run {run_id} is not an approved model, so there is no approval to withdraw. "
            "`python -m core approvals` lists them."
        )
    now = utcnow()
    for row in rows:
        row.withdrawn_by, row.withdrawn_at = user.name, now
    session.flush()
    return _record(rows[0], False)


def _run_label(run: Run) -> str:
    name = f" ({run.name})" if run.name else ""
    return f"run {run.id}{name} · {run.dataset.name}"


def _usable_model(settings: Settings, run: Run) -> tuple[list[str], str]:
    """(the classes, the sha256) of a succeeded run's own, whole model file; UserError otherwise."""
    if run.status != RunStatus.succeeded:
        raise UserError(f"Run {run.id} is {run.status.value}: only a run that succeeded has a model to approve.")
    path = model_path(settings, run.id)
    if not path.exists():
        raise UserError(
            f"Run {run.id} has no model file ({path.name} is missing), so it cannot be approved; "
            "train it again to use it."
        )
    problem = model_file_problem(path)
    if problem is not None:
        raise UserError(f"Run {run.id}'s model file is damaged ({problem}); it cannot be approved.")
    meta = _model_description(path)
    if meta.get("run_created") != run.created_at.isoformat():
        raise UserError(
            f"The model file under run {run.id}'s folder belongs to another run (another database's); "
            "it cannot be approved."
        )
    return list(meta["classes"]), file_sha256(path)


def _model_description(path: Path) -> dict:
    """The description in a model file's safetensors header (core/inference/model_file.py), read
    without torch. Called after model_file_problem has found the header whole."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return json.loads(header.get("__metadata__", {}).get(MODEL_META_KEY) or "{}")


# path -> (the file's version: inode, size, times; its sha256). One entry per path, replaced when the
# file changes, so it holds every model file at once (GET /api/v1/models hashes each on every call)
# and never more entries than there have been model files.
_hashes: dict[str, tuple[tuple[int, ...], str]] = {}
_hashes_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read again only when the file has changed (a model file is
    replaced by renaming a new one over it, which gives it a new inode)."""
    info = path.stat()
    version = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    with _hashes_lock:
        known = _hashes.get(str(path))
    if known is not None and known[0] == version:
        return known[1]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _hashes_lock:
        _hashes[str(path)] = (version, digest)
    return digest
