"""Administrator limits (MAX_UPLOAD_MB, MAX_IMAGES_PER_DATASET, MAX_IMAGE_PIXELS, MAX_QUEUED_RUNS,
MAX_DISK_GB): each refuses with a message naming the setting, and a refusal stores nothing."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.access import limits
from core.access.accounts import LOCAL_USER
from core.config import Settings, load_settings
from core.data import uploads
from core.data.ingest import ingest
from core.errors import UserError
from core.jobs import runs
from core.store.db import Dataset, Image, Run, Split
from core.training.run_config import RunConfig
from tests.synthetic import synthetic_image, write_dataset

TINY = dict(image_size=32, per_class=4, batch_size=4, lr=1e-3, weights="none", device="cpu", epochs=1, seed=3)


def limited(settings: Settings, **env: str) -> Settings:
    """Settings on the same APP_HOME (and so the same database) with some limits set."""
    return load_settings({"APP_HOME": str(settings.app_home), **env})


def count(Session, model) -> int:
    with Session() as s:
        return s.scalar(select(func.count()).select_from(model))


def files_under(settings: Settings) -> set[Path]:
    """Every file under APP_HOME except the database (which SQLite may touch on any query) and the
    ingest lock (an empty file that any ingest opens; it holds no data)."""
    if not settings.app_home.exists():
        return set()
    return {
        p
        for p in settings.app_home.rglob("*")
        if p.is_file() and not p.name.startswith("app.db") and p.name != "ingest.lock"
    }


def png(label: str, i: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image(label, i).save(buf, "PNG")
    return buf.getvalue()


def zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*.tif")):
            zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


def do_ingest(Session, settings, source, name="ds"):
    with Session.begin() as s:
        return ingest(s, settings, source, name, user=LOCAL_USER)


def snapshot(Session, settings):
    return (
        count(Session, Dataset),
        count(Session, Image),
        count(Session, Run),
        count(Session, Split),
        files_under(settings),
    )


def test_defaults():
    s = load_settings({"APP_HOME": "/tmp/x"})
    assert (s.max_upload_mb, s.max_images_per_dataset, s.max_queued_runs, s.max_disk_gb) == (2048, 20_000, 20, 0)


# --- MAX_UPLOAD_MB -------------------------------------------------------------------------------


def test_zip_upload_over_max_upload_mb_is_refused_before_writing(settings, Session, tmp_path):
    data = zip_of(write_dataset(tmp_path / "src", per_class=2))
    assert len(data) > 2 * 1024
    small = limited(settings, MAX_UPLOAD_MB=str(1 / 1024))  # 1 KB
    with Session.begin() as s, pytest.raises(UserError, match=r"MAX_UPLOAD_MB limit of 0\.000976562 MB") as e:
        uploads.ingest_zip(s, small, io.BytesIO(data), "set.zip", "set", user=LOCAL_USER)
    assert "Nothing was ingested" in str(e.value)
    assert count(Session, Dataset) == 0 and count(Session, Image) == 0
    assert files_under(settings) == set() and not settings.tmp_dir.exists()
    # The same upload under a limit it fits in goes through.
    with Session.begin() as s:
        assert (
            uploads.ingest_zip(s, limited(settings, MAX_UPLOAD_MB="1"), data, "set.zip", "set", user=LOCAL_USER).added
            == 6
        )


def test_loose_files_count_together_against_max_upload_mb(settings, Session):
    files = [("CLL", f"{i}.png", io.BytesIO(png("CLL", i))) for i in range(2)]
    files += [("FL", f"{i}.png", png("FL", i)) for i in range(2)]
    total = sum(limits.content_size(c) for _, _, c in files)
    largest = max(limits.content_size(c) for _, _, c in files)
    # Each file fits on its own; together they do not.
    cap = limited(settings, MAX_UPLOAD_MB=str((largest + 1) / 1024**2))
    with Session.begin() as s, pytest.raises(UserError, match="MAX_UPLOAD_MB") as e:
        uploads.ingest_files(s, cap, files, "loose", user=LOCAL_USER)
    assert f"{total / 1024**2:,.1f} MB" in str(e.value)
    assert count(Session, Dataset) == 0 and files_under(settings) == set()


# --- MAX_IMAGES_PER_DATASET ----------------------------------------------------------------------


def test_new_dataset_over_max_images_is_refused(settings, Session, tmp_path):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"))  # 4 images
    with pytest.raises(UserError, match="MAX_IMAGES_PER_DATASET") as e:
        do_ingest(Session, limited(settings, MAX_IMAGES_PER_DATASET="3"), src)
    assert "Dataset 'ds' has 0 image(s) and 4 new one(s) were offered" in str(e.value)
    assert "limit of 3" in str(e.value)
    assert count(Session, Dataset) == 0 and count(Session, Image) == 0
    assert files_under(settings) == set()


def test_growing_a_dataset_past_max_images_is_refused(settings, Session, tmp_path):
    cap = limited(settings, MAX_IMAGES_PER_DATASET="5")
    first = write_dataset(tmp_path / "a", per_class=2, classes=("CLL", "FL"))
    assert do_ingest(Session, cap, first).added == 4
    # Re-ingesting what is already there offers nothing new: allowed at the limit.
    assert do_ingest(Session, limited(settings, MAX_IMAGES_PER_DATASET="4"), first).already_present == 4
    more = tmp_path / "b"
    for label in ("CLL", "FL"):
        (more / label).mkdir(parents=True)
        for i in range(10, 12):
            synthetic_image(label, i).save(more / label / f"{i}.png")
    before = snapshot(Session, settings)
    with pytest.raises(
        UserError,
        match=r"has 4 image\(s\) and 4 new one\(s\) were offered: 8 is more than "
        r"the MAX_IMAGES_PER_DATASET limit of 5",
    ):
        do_ingest(Session, cap, more)
    assert snapshot(Session, settings) == before


def test_zero_means_no_image_limit(settings, Session, tmp_path):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"))
    assert do_ingest(Session, limited(settings, MAX_IMAGES_PER_DATASET="0"), src).added == 4


# --- MAX_IMAGE_PIXELS ----------------------------------------------------------------------------


def test_too_many_pixels_names_the_setting(settings, Session, tmp_path):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), size=(64, 48))
    synthetic_image("CLL", 9, (80, 80)).save(src / "CLL" / "big.png")
    report = do_ingest(Session, limited(settings, MAX_IMAGE_PIXELS=str(64 * 48)), src)
    assert report.added == 4
    reasons = dict(report.skipped)
    assert reasons["CLL/big.png"] == "too many pixels: 80x80 is more than 3,072 (MAX_IMAGE_PIXELS)"


# --- MAX_QUEUED_RUNS -----------------------------------------------------------------------------


def test_queue_over_max_queued_runs_is_refused(settings, Session, tmp_path):
    do_ingest(Session, settings, write_dataset(tmp_path / "src", per_class=6, classes=("CLL", "FL")))
    cap = limited(settings, MAX_QUEUED_RUNS="3")
    with Session.begin() as s:
        runs.create_runs(s, cap, RunConfig(dataset="ds", **TINY), user=LOCAL_USER)
    before = snapshot(Session, settings)
    kfold = RunConfig(dataset="ds", split="kfold", folds=3, **TINY)
    with Session.begin() as s, pytest.raises(UserError, match="MAX_QUEUED_RUNS") as e:
        runs.create_runs(s, cap, kfold, user=LOCAL_USER)
    assert "1 run(s) are already queued and this adds 3" in str(e.value) and "limit of 3" in str(e.value)
    assert snapshot(Session, settings) == before  # no run, no split
    # Two more fit exactly.
    with Session.begin() as s:
        runs.create_runs(s, cap, RunConfig(dataset="ds", **{**TINY, "seed": 4}), user=LOCAL_USER)
        runs.create_runs(s, cap, RunConfig(dataset="ds", **{**TINY, "seed": 5}), user=LOCAL_USER)
    with Session.begin() as s, pytest.raises(UserError, match=r"3 run\(s\) are already queued and this adds 1"):
        runs.create_runs(s, cap, RunConfig(dataset="ds", **{**TINY, "seed": 6}), user=LOCAL_USER)
    assert count(Session, Run) == 3


# --- MAX_DISK_GB ---------------------------------------------------------------------------------


def test_disk_usage_counts_all_of_app_home_tmp_included(settings):
    (settings.images_dir / "ab").mkdir(parents=True)
    (settings.images_dir / "ab" / "x.tif").write_bytes(b"x" * 1000)
    (settings.runs_dir / "1").mkdir(parents=True)
    (settings.runs_dir / "1" / "last.pt").write_bytes(b"y" * 500)
    settings.tmp_dir.mkdir(parents=True)
    (settings.tmp_dir / "upload.zip").write_bytes(b"z" * 10_000)
    db = sum(p.stat().st_size for p in settings.app_home.glob("app.db*"))
    assert limits.disk_usage(settings) == 11_500 + db


def test_over_max_disk_gb_refuses_ingest_uploads_and_runs(settings, Session, tmp_path):
    do_ingest(Session, settings, write_dataset(tmp_path / "src", per_class=6, classes=("CLL", "FL")))
    full = limited(settings, MAX_DISK_GB="0.000001", IMPORT_ROOTS=str(tmp_path))  # 1 kB
    other = write_dataset(tmp_path / "other", per_class=2, classes=("CLL", "FL"), size=(40, 40))
    before = snapshot(Session, settings)
    message = r"uses [\d.]+ GB, more than the MAX_DISK_GB limit of 1e-06 GB\. Delete datasets or runs"

    with pytest.raises(UserError, match=message):
        do_ingest(Session, full, other, "other")
    with pytest.raises(UserError, match=message):
        do_ingest(Session, full, other, "ds")
    with Session.begin() as s, pytest.raises(UserError, match=message):
        uploads.ingest_zip(s, full, zip_of(other), "other.zip", "other", user=LOCAL_USER)
    with Session.begin() as s, pytest.raises(UserError, match=message):
        uploads.ingest_files(
            s, full, [("CLL", "a.png", png("CLL", 50)), ("FL", "b.png", png("FL", 50))], "o", user=LOCAL_USER
        )
    with Session.begin() as s, pytest.raises(UserError, match=message):
        uploads.import_folder(s, full, other, "other", user=LOCAL_USER)
    with Session.begin() as s, pytest.raises(UserError, match=message):
        runs.create_runs(s, full, RunConfig(dataset="ds", **TINY), user=LOCAL_USER)

    assert snapshot(Session, settings) == before
    assert not settings.tmp_dir.exists() or list(settings.tmp_dir.iterdir()) == []


def test_max_disk_gb_counts_what_an_ingest_or_upload_would_add(settings, Session, tmp_path):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"))
    used = limits.disk_usage(settings)  # the empty database
    new_bytes = sum(p.stat().st_size for p in src.rglob("*.tif"))
    # Room for what is there now, not for the new images.
    cap = limited(settings, MAX_DISK_GB=str((used + new_bytes // 2) / 1e9))
    before = snapshot(Session, settings)
    with pytest.raises(UserError, match=r"the 4 new image\(s\) would add [\d.]+ GB, more than the MAX_DISK_GB"):
        do_ingest(Session, cap, src)
    with (
        Session.begin() as s,
        pytest.raises(UserError, match=r"this upload would add [\d.]+ GB, more than the MAX_DISK_GB"),
    ):
        uploads.ingest_zip(s, cap, zip_of(src), "src.zip", "ds", user=LOCAL_USER)
    assert snapshot(Session, settings) == before
    # With room for them it goes through.
    roomy = limited(settings, MAX_DISK_GB=str((limits.disk_usage(settings) + 10 * new_bytes) / 1e9))
    assert do_ingest(Session, roomy, src).added == 4


def test_names_and_notes_with_a_nul_character_are_refused_before_the_database(settings, Session, tmp_path):
    """PostgreSQL cannot store a NUL in text (a 500 once); every name and note is checked for one."""
    from core.access.limits import check_name_length
    from core.data.ingest import ingest
    from core.jobs import runs
    from core.training.run_config import RunConfig
    from core.transforms.augment import AugmentParams
    from tests.synthetic import write_dataset

    with pytest.raises(UserError, match="NUL"):
        check_name_length("ana\x00", "User name")
    write_dataset(tmp_path / "src", per_class=2)
    with Session.begin() as s:
        ingest(s, settings, tmp_path / "src", "tiny", user=LOCAL_USER)
    config = RunConfig(dataset="tiny", image_size=32, epochs=1, per_class=2, weights="none", device="cpu")
    for name, notes in (("run\x00one", None), ("run one", "see\x00this")):
        with pytest.raises(UserError, match="NUL"), Session.begin() as s:
            runs.create_runs(s, settings, config, name=name, notes=notes, user=LOCAL_USER)
    with pytest.raises(UserError, match="from 1 to 64"):  # a grid that would tie up the shared worker
        AugmentParams(distortion_grid_width=10**6)
