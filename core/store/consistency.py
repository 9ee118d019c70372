"""Does the database agree with the files under APP_HOME?

Problems the check finds (one `Problem` each):

- missing     an image row's stored file is not there
- damaged     an image's stored file is empty or not a regular file, or (deep check) its sha256 is
              not the one recorded
- model       a succeeded run's model file (model.safetensors, what prediction loads) is missing or
              empty, or (deep check) unreadable or its weights not those it records
- orphan      a file under images/ that no image row references, e.g. stored by an ingest that was
              killed before its commit
- temp        a leftover of an interrupted write: an atomic write's temporary file (core/store/files.py),
              or an upload's work folder under tmp/
- run_folder  a folder under runs/ whose run has no row (e.g. its dataset was deleted)
- slide_source  a slide a dataset's tiles were cut from, ingested from a folder on the server, is
              no longer there or has changed since (its size or mtime differ, and then its sha256):
              the tiles stay valid, but the slide is no longer the one they came from

The first three mean lost data and need a person, the last one a look; `fix` removes only the last three kinds (files,
never database rows). The quick check looks at existence and size; the deep one also hashes every
stored image, which reads all of them.

An ingest stores its files before it commits their rows, so while one runs its new files look like
orphans: the check then leaves images/ and tmp/ alone (`ingest_running`), and `fix` refuses.
Temporary files of model files, checkpoints and the decoded-image cache count as leftovers once
nothing has written to them for TEMP_GRACE_SECONDS (a file being written keeps getting newer).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.config import Settings
from core.errors import UserError
from core.store.db import Dataset, Image, Run, RunStatus, Slide
from core.store.files import exclusive_ingest_lock, is_temp_name
from core.store.runs import model_file_problem, model_path

TEMP_GRACE_SECONDS = 120
FIXABLE = ("orphan", "temp", "run_folder")
LABELS = {
    "missing": "image file(s) missing",
    "damaged": "image file(s) damaged",
    "model": "finished run(s) without a usable model file",
    "orphan": "unreferenced file(s) under images/",
    "temp": "leftover temporary file(s)",
    "run_folder": "run folder(s) without a run",
    "slide_source": "slide(s) gone or changed since they were ingested",
}


@dataclass(frozen=True)
class Problem:
    kind: str  # a key of LABELS
    path: str  # relative to APP_HOME; folders end in "/"
    detail: str = ""  # e.g. which dataset an image belongs to, or what is wrong with it


@dataclass
class ConsistencyReport:
    deep: bool
    images_checked: int  # stored image files (several rows can share one)
    runs_checked: int
    problems: list[Problem] = field(default_factory=list)
    # An ingest held the lock, so unreferenced and temporary files were not judged.
    ingest_running: bool = False
    removed: list[str] = field(default_factory=list)  # by fix()

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def fixable(self) -> bool:
        """Whether `fix` would leave nothing behind: every problem is a leftover file."""
        return all(p.kind in FIXABLE for p in self.problems)

    @property
    def remaining(self) -> list[Problem]:
        """Problems still there after `fix` removed what it could."""
        removed = set(self.removed)
        return [p for p in self.problems if p.path not in removed]

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def summary(self, examples: int = 3, quote: str = "") -> list[str]:
        """One line per kind of problem, with a count and a few paths (each between `quote`s)."""
        lines = []
        for kind, label in LABELS.items():
            found = self.of_kind(kind)
            if found:
                shown = ", ".join(f"{quote}{p.path}{quote}" for p in found[:examples])
                more = f" and {len(found) - examples} more" if len(found) > examples else ""
                lines.append(f"{len(found)} {label}: {shown}{more}")
        return lines

    def format(self) -> str:
        """The whole report, one problem a line, for the command line."""
        how = "existence, size and sha256" if self.deep else "existence and size"
        lines = [f"checked {self.images_checked} stored image file(s) ({how}) and {self.runs_checked} run(s)"]
        if self.ingest_running:
            lines.append("an ingest is running: unreferenced and temporary files under images/ and tmp/ not checked")
        for p in self.problems:
            lines.append(f"{p.kind}: {p.path}" + (f" ({p.detail})" if p.detail else ""))
        for path in self.removed:
            lines.append(f"removed: {path}")
        if self.clean:
            lines.append("clean: database and files agree")
        elif self.removed:
            lines.append(f"{len(self.problems)} problem(s), {len(self.remaining)} left after removing leftovers")
        else:
            hint = "; `check --fix` removes them" if self.fixable else ""
            lines.append(f"{len(self.problems)} problem(s){hint}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _rel(settings: Settings, path: Path) -> str:
    return path.relative_to(settings.app_home).as_posix()


def _walk_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(folder):
        out.extend(Path(dirpath) / f for f in files)
    return sorted(out)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _old_enough(path: Path, now: float) -> bool:
    try:
        return now - path.stat().st_mtime > TEMP_GRACE_SECONDS
    except FileNotFoundError:  # renamed into place just now
        return False


def _image_owners(session: Session) -> dict[str, list[tuple[str, str, str]]]:
    """stored path -> (sha256, original name, dataset name) of each row that references it."""
    rows = session.execute(
        select(Image.stored_path, Image.sha256, Image.original_name, Dataset.name).join(Dataset)
    ).all()
    owners: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for stored_path, sha, original, dataset in rows:
        owners[stored_path].append((sha, original, dataset))
    return owners


def _where(rows: list[tuple[str, str, str]]) -> str:
    _, original, dataset = rows[0]
    more = f" and {len(rows) - 1} more row(s)" if len(rows) > 1 else ""
    return f"'{original}' in dataset '{dataset}'{more}"


def _check_images(session: Session, settings: Settings, judge_leftovers: bool) -> tuple[int, list[Problem]]:
    # Files are listed before rows are read: a file stored and committed in between is then
    # referenced, never mistaken for an orphan.
    on_disk = _walk_files(settings.images_dir) if judge_leftovers else []
    owners = _image_owners(session)
    problems = []
    for stored_path in sorted(owners):
        where = _where(owners[stored_path])
        path = settings.app_home / stored_path
        try:
            st = path.stat()
        except FileNotFoundError:
            problems.append(Problem("missing", stored_path, where))
            continue
        if not path.is_file():
            problems.append(Problem("damaged", stored_path, f"not a regular file; {where}"))
        elif st.st_size == 0:
            problems.append(Problem("damaged", stored_path, f"empty file; {where}"))

    for path in on_disk:
        rel = _rel(settings, path)
        if is_temp_name(path.name):
            problems.append(Problem("temp", rel, "interrupted write"))
        elif rel not in owners:
            problems.append(Problem("orphan", rel))
    return len(owners), problems


def _check_scratch(settings: Settings) -> list[Problem]:
    """Work folders of uploads and zip ingests under tmp/; only called while no ingest runs."""
    if not settings.tmp_dir.is_dir():
        return []
    return [
        Problem(
            "temp", _rel(settings, p) + ("/" if p.is_dir() else ""), "work files of an interrupted upload or ingest"
        )
        for p in sorted(settings.tmp_dir.iterdir())
    ]


def _check_runs(session: Session, settings: Settings) -> tuple[int, list[Problem]]:
    now = time.time()
    problems = []
    # Folders first, rows second: a run's folder is made only after its row is committed.
    folders = sorted(p for p in settings.runs_dir.iterdir() if p.is_dir()) if settings.runs_dir.is_dir() else []
    runs = dict(session.execute(select(Run.id, Run.status)).all())
    for folder in folders:
        if folder.name.isdigit() and int(folder.name) not in runs:
            problems.append(Problem("run_folder", _rel(settings, folder) + "/", "no run with this id"))
            continue
        for path in _walk_files(folder):
            if is_temp_name(path.name) and _old_enough(path, now):
                problems.append(Problem("temp", _rel(settings, path), "interrupted checkpoint write"))
    for run_id, status in sorted(runs.items()):
        if status != RunStatus.succeeded:
            continue
        model = model_path(settings, run_id)
        rel = _rel(settings, model)
        if not model.is_file():
            problems.append(Problem("model", rel, f"run {run_id} succeeded; its model file is missing"))
        elif model.stat().st_size == 0:
            problems.append(Problem("model", rel, f"run {run_id}: empty file"))
    return len(runs), problems


def _deep_problems(session: Session, settings: Settings, judged: set[str]) -> list[Problem]:
    """Hash every stored image and read every succeeded run's model file, except paths in `judged`
    (already reported). Runs without the ingest lock: a file deleted meanwhile is passed over."""
    problems = []
    for stored_path, rows in sorted(_image_owners(session).items()):
        if stored_path in judged:
            continue
        try:
            actual = _sha256(settings.app_home / stored_path)
        except (FileNotFoundError, IsADirectoryError):
            continue
        if any(actual != sha for sha, _, _ in rows):
            problems.append(
                Problem(
                    "damaged", stored_path, f"sha256 is {actual[:12]}…, recorded {rows[0][0][:12]}…; {_where(rows)}"
                )
            )
    for run_id in session.scalars(select(Run.id).where(Run.status == RunStatus.succeeded).order_by(Run.id)):
        model = model_path(settings, run_id)
        rel = _rel(settings, model)
        if rel in judged or not model.is_file():
            continue
        bad = model_file_problem(model)
        if bad is not None:
            problems.append(Problem("model", rel, f"run {run_id}: {bad}"))
    return problems


def _check_cache(settings: Settings) -> list[Problem]:
    folder = settings.app_home / "cache"
    if not folder.is_dir():
        return []
    now = time.time()
    return [
        Problem("temp", _rel(settings, p), "interrupted cache write")
        for p in _walk_files(folder)
        if is_temp_name(p.name) and _old_enough(p, now)
    ]


def check_slide_sources(session: Session, dataset: Dataset) -> list[Problem]:
    """The dataset's slides recorded with a server path that are gone or changed since ingest.

    A slide is hashed again only when its size or mtime differ from its record: a file touched
    but not changed is not reported. Problems name the slide as CLASS/file; the detail gives its path.
    """
    problems = []
    for slide in session.scalars(
        select(Slide).where(Slide.dataset_id == dataset.id, Slide.source_path.is_not(None)).order_by(Slide.id)
    ):
        change = _slide_change(slide)
        if change is not None:
            problems.append(
                Problem(
                    "slide_source",
                    f"{slide.label}/{slide.file_name}",
                    f"dataset '{dataset.name}': {change}; {slide.source_path}",
                )
            )
    return problems


def _slide_change(slide: Slide) -> str | None:
    path = Path(slide.source_path or "")
    try:
        st = path.stat()
    except OSError:
        return "no longer there"
    if st.st_size == slide.size_bytes and st.st_mtime == slide.mtime:
        return None
    try:
        actual = _sha256(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if actual == slide.sha256:
        return None
    return f"changed since it was ingested (sha256 {actual[:12]}…, recorded {slide.sha256[:12]}…)"


def _add_slides(Session: sessionmaker, report: ConsistencyReport) -> None:
    # Outside the ingest lock: a changed slide is hashed, which can take a while.
    with Session() as s:
        for dataset in s.scalars(select(Dataset).where(Dataset.id.in_(select(Slide.dataset_id))).order_by(Dataset.id)):
            report.problems += check_slide_sources(s, dataset)


def _quick(session: Session, settings: Settings, judge_leftovers: bool) -> ConsistencyReport:
    images, problems = _check_images(session, settings, judge_leftovers)
    if judge_leftovers:
        problems += _check_scratch(settings)
    runs, run_problems = _check_runs(session, settings)
    problems += run_problems + _check_cache(settings)
    return ConsistencyReport(
        deep=False, images_checked=images, runs_checked=runs, problems=problems, ingest_running=not judge_leftovers
    )


def _add_deep(Session: sessionmaker, settings: Settings, report: ConsistencyReport) -> None:
    with Session() as s:
        report.problems += _deep_problems(s, settings, {p.path for p in report.problems})
    report.deep = True


def check(Session: sessionmaker, settings: Settings, *, deep: bool = False) -> ConsistencyReport:
    """Compare the database with the files under APP_HOME; changes nothing.

    The quick check (default) costs a stat per stored file; `deep` also reads and hashes every
    stored image and model file.
    """
    # The lock only for the listing: hashing can take minutes, and uploads would wait for it.
    with exclusive_ingest_lock(settings) as idle, Session() as s:
        report = _quick(s, settings, judge_leftovers=idle)
    _add_slides(Session, report)
    if deep:
        _add_deep(Session, settings, report)
    return report


def fix(Session: sessionmaker, settings: Settings, *, deep: bool = False) -> ConsistencyReport:
    """Check, then remove unreferenced files, temporary leftovers and folders of deleted runs.

    Never touches a database row or a referenced file. Refused (UserError, nothing removed) while
    an ingest runs. The returned report lists what was found and, in `removed`, what was deleted.
    """
    with exclusive_ingest_lock(settings) as idle:
        if not idle:
            raise UserError(
                "An ingest is running; its new files are not referenced until it finishes. "
                "Run the check again when it is done. Nothing was removed."
            )
        with Session() as s:
            report = _quick(s, settings, judge_leftovers=True)
        for problem in report.problems:
            if problem.kind not in FIXABLE:
                continue
            path = settings.app_home / problem.path
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            report.removed.append(problem.path)
    _add_slides(Session, report)
    if deep:
        _add_deep(Session, settings, report)
    return report
