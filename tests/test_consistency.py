"""The consistency check (core/store/consistency.py): each kind of disagreement between the database and
the files under APP_HOME is found, `fix` removes leftovers only, a running ingest is left alone, the
command line's exit status, and the warning on the Home page."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from streamlit.testing.v1 import AppTest

from core.__main__ import main
from core.access.accounts import LOCAL_USER
from core.data.ingest import ingest
from core.errors import UserError
from core.store import consistency
from core.store.db import Dataset, Image, Run, RunStatus
from core.store.files import hold_ingest_lock
from tests.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dataset(settings, Session, tmp_path) -> list[Image]:
    write_dataset(tmp_path / "src", per_class=3)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "lymphoma", user=LOCAL_USER)
    with Session() as s:
        return list(s.scalars(select(Image).order_by(Image.id)))


def kinds(report: consistency.ConsistencyReport) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.kind, []).append(p.path)
    return out


def test_a_fresh_ingest_is_clean(settings, Session, dataset):
    report = consistency.check(Session, settings, deep=True)
    assert report.clean, report.format()
    assert report.images_checked == len(dataset) == 9
    assert "clean" in report.format()


def test_every_kind_of_problem_is_found_and_fix_removes_only_leftovers(settings, Session, dataset):
    home = settings.app_home
    missing, emptied, swapped = (home / dataset[i].stored_path for i in range(3))
    missing.unlink()
    emptied.write_bytes(b"")
    swapped.write_bytes(bytes(len(swapped.read_bytes())))  # same size, other bytes: only a hash tells
    orphan = settings.images_dir / "ab" / ("ab" + "0" * 62 + ".tif")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"stored by an ingest that never committed")
    temp = missing.parent / ".tmp-k3j2h1"
    temp.write_bytes(b"half")
    upload = settings.tmp_dir / "upload-x1y2"
    (upload / "ds").mkdir(parents=True)
    (upload / "ds" / "a.zip").write_bytes(b"zip")
    (settings.runs_dir / "77").mkdir(parents=True)
    (settings.runs_dir / "77" / "last.pt").write_bytes(b"of a deleted run")
    with Session.begin() as s:
        d = s.scalar(select(Dataset))
        finished = Run(dataset_id=d.id, experiment="e", config={}, seed=0, status=RunStatus.succeeded)
        broken = Run(dataset_id=d.id, experiment="e", config={}, seed=0, status=RunStatus.succeeded)
        failed = Run(dataset_id=d.id, experiment="e", config={}, seed=0, status=RunStatus.failed)
        s.add_all([finished, broken, failed])
        s.flush()
        ids = finished.id, broken.id, failed.id
    (settings.runs_dir / str(ids[0])).mkdir()
    (settings.runs_dir / str(ids[1])).mkdir()
    (settings.runs_dir / str(ids[1]) / "model.safetensors").write_bytes(b"not safetensors")  # deep check reads it
    rel = lambda p: p.relative_to(home).as_posix()  # noqa: E731

    quick = consistency.check(Session, settings)
    assert kinds(quick) == {
        "missing": [rel(missing)],
        "damaged": [rel(emptied)],
        "orphan": [rel(orphan)],
        "temp": [rel(temp), "tmp/upload-x1y2/"],
        "run_folder": ["runs/77/"],
        "model": [f"runs/{ids[0]}/model.safetensors"],  # a failed run needs no model file
    }, quick.format()
    assert not quick.fixable and not quick.deep
    assert any(line.startswith("1 image file(s) missing:") for line in quick.summary())

    deep = consistency.check(Session, settings, deep=True)
    assert kinds(deep)["damaged"] == [rel(emptied), rel(swapped)]
    assert kinds(deep)["model"] == [f"runs/{ids[0]}/model.safetensors", f"runs/{ids[1]}/model.safetensors"]
    assert "sha256 is" in deep.of_kind("damaged")[1].detail

    fixed = consistency.fix(Session, settings)
    assert sorted(fixed.removed) == sorted([rel(orphan), rel(temp), "tmp/upload-x1y2/", "runs/77/"])
    assert not orphan.exists() and not temp.exists() and not upload.exists()
    assert not (settings.runs_dir / "77").exists()
    assert (settings.runs_dir / str(ids[1]) / "model.safetensors").exists()  # a referenced file is never removed
    assert {p.kind for p in fixed.remaining} == {"missing", "damaged", "model"}
    with Session() as s:  # rows are never touched
        assert s.scalar(select(func.count()).select_from(Image)) == 9
        assert s.scalar(select(func.count()).select_from(Run)) == 3
    assert kinds(consistency.check(Session, settings)).keys() == {"missing", "damaged", "model"}


def test_a_running_ingest_is_left_alone(settings, Session, dataset):
    orphan = settings.images_dir / "cd" / ("cd" + "1" * 62 + ".png")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"an ingest's file, its row not committed yet")
    ingesting = Session()
    ingesting.begin()
    hold_ingest_lock(ingesting, settings)
    try:
        report = consistency.check(Session, settings)
        assert report.ingest_running and report.clean, report.format()
        with pytest.raises(UserError, match="ingest is running"):
            consistency.fix(Session, settings)
        assert orphan.exists()
    finally:
        ingesting.rollback()  # ends the transaction, which releases the lock
        ingesting.close()
    assert consistency.fix(Session, settings).removed == [orphan.relative_to(settings.app_home).as_posix()]


def test_temp_files_of_checkpoints_and_cache_count_once_nobody_writes_them(settings, Session, dataset):
    checkpoint_tmp = settings.runs_dir / "5" / "tmpa1b2c3d4.tmp"  # the naming of earlier versions
    cache_tmp = settings.app_home / "cache" / "64" / "ab" / ".tmp-q9w8e7"
    for p in (checkpoint_tmp, cache_tmp):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"being written")
    # Run 5 has no row either, so its folder is reported as a whole; give it a row's id instead.
    with Session.begin() as s:
        run = Run(dataset_id=s.scalar(select(Dataset.id)), experiment="e", config={}, seed=0)
        s.add(run)
        s.flush()
        run_id = run.id
    checkpoint_tmp.parent.rename(settings.runs_dir / str(run_id))
    checkpoint_tmp = settings.runs_dir / str(run_id) / checkpoint_tmp.name

    assert consistency.check(Session, settings).clean  # fresh: a write may be under way
    old = time.time() - consistency.TEMP_GRACE_SECONDS - 10
    for p in (checkpoint_tmp, cache_tmp):
        os.utime(p, (old, old))
    report = consistency.check(Session, settings)
    assert sorted(report.of_kind("temp"), key=lambda p: p.path) == sorted(report.problems, key=lambda p: p.path)
    assert len(report.problems) == 2 and report.fixable


def test_command_line_exit_status(settings, Session, dataset, monkeypatch, capsys):
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["check"])
    assert exit_.value.code == 0
    assert "clean" in capsys.readouterr().out

    leftover = settings.images_dir / ".tmp-zzz"
    leftover.write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--deep"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "temp: images/.tmp-zzz" in out and "--fix" in out
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--fix"])
    assert exit_.value.code == 0 and not leftover.exists()
    assert "removed: images/.tmp-zzz" in capsys.readouterr().out

    (settings.app_home / dataset[0].stored_path).unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--fix"])
    assert exit_.value.code == 1  # a missing file cannot be fixed by removing files


def test_home_page_warns_about_problems_found_at_start(settings, Session, dataset, monkeypatch):
    (settings.app_home / dataset[0].stored_path).unlink()
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    warnings = [w.value for w in at.warning if "disagree" in w.value]
    assert len(warnings) == 1
    assert f"1 image file(s) missing: `{dataset[0].stored_path}`" in warnings[0]
    assert "python -m core check --fix" in warnings[0]
