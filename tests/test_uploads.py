"""Datasets from the web app: uploads through a temp folder, server folders only below IMPORT_ROOTS."""

import io
import zipfile

import pytest
from sqlalchemy import select

from core.access.accounts import LOCAL_USER
from core.config import load_settings
from core.data import uploads
from core.errors import UserError
from core.store.db import Dataset
from tests.synthetic import synthetic_image, write_dataset


def png(label: str, i: int) -> bytes:
    buf = io.BytesIO()
    synthetic_image(label, i).save(buf, "PNG")
    return buf.getvalue()


def test_zip_upload_is_ingested_and_its_temp_folder_removed(settings, Session, tmp_path):
    write_dataset(tmp_path / "src" / "wrapper", per_class=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted((tmp_path / "src").rglob("*.tif")):
            zf.write(p, p.relative_to(tmp_path / "src").as_posix())
    with Session.begin() as s:
        report = uploads.ingest_zip(s, settings, io.BytesIO(buf.getvalue()), "my set.zip", "set", user=LOCAL_USER)
    assert report.added == 6 and report.class_counts == {"CLL": 2, "FL": 2, "MCL": 2}
    with Session() as s:
        assert s.scalar(select(Dataset.source)) == "upload my set.zip"
    assert not any(settings.tmp_dir.iterdir())


@pytest.mark.parametrize(
    "filename, content, message",
    [
        ("images.tar", b"x", "not a .zip file"),
        ("empty.zip", b"", "is empty"),
        ("broken.zip", b"PK\x03\x04 not really", "not a zip file"),
    ],
)
def test_bad_zip_uploads_are_user_errors(settings, Session, filename, content, message):
    with Session.begin() as s, pytest.raises(UserError, match=message):
        uploads.ingest_zip(s, settings, content, filename, "x", user=LOCAL_USER)
    assert not any(settings.tmp_dir.iterdir()) if settings.tmp_dir.exists() else True


def test_files_by_class_keep_same_named_files_and_strip_folders(settings, Session):
    files = [("CLL", "a.png", png("CLL", 0)), ("CLL", "a.png", png("CLL", 1)), ("FL", "../../etc/b.png", png("FL", 0))]
    with Session.begin() as s:
        report = uploads.ingest_files(s, settings, files, "loose", user=LOCAL_USER)
    assert report.added == 3 and report.class_counts == {"CLL": 2, "FL": 1}
    with Session() as s:
        names = sorted(im.original_name for im in s.scalar(select(Dataset)).images)
    assert names == ["CLL/a.png", "CLL/a~1.png", "FL/b.png"]


def test_files_of_one_class_need_an_existing_dataset(settings, Session):
    with Session.begin() as s, pytest.raises(UserError, match="need at least 2"):
        uploads.ingest_files(s, settings, [("CLL", "a.png", png("CLL", 0))], "one", user=LOCAL_USER)
    with Session.begin() as s:
        uploads.ingest_files(
            s, settings, [("CLL", "a.png", png("CLL", 0)), ("FL", "b.png", png("FL", 0))], "two", user=LOCAL_USER
        )
    with Session.begin() as s:  # more images of a known class are fine
        report = uploads.ingest_files(s, settings, [("CLL", "c.png", png("CLL", 5))], "two", user=LOCAL_USER)
    assert report.class_counts == {"CLL": 2, "FL": 1}
    with Session.begin() as s, pytest.raises(UserError, match="No files"):
        uploads.ingest_files(s, settings, [], "two", user=LOCAL_USER)


def test_server_import_only_below_the_import_roots(tmp_path, Session):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    write_dataset(allowed / "set", per_class=2)
    write_dataset(other, per_class=2)
    (allowed / "link").symlink_to(other)  # a link inside the root must not lead outside it
    off = load_settings({"APP_HOME": str(tmp_path / "home")})
    on = load_settings({"APP_HOME": str(tmp_path / "home"), "IMPORT_ROOTS": str(allowed)})
    with pytest.raises(UserError, match="turned off"):
        uploads.check_import_path(off, allowed / "set")
    for path in (other, allowed / "link", allowed / ".." / "other", "/etc"):
        with pytest.raises(UserError, match="outside the folders"):
            uploads.check_import_path(on, path)
    with pytest.raises(UserError, match="does not exist"):
        uploads.check_import_path(on, allowed / "missing")
    with Session.begin() as s:  # the fixture's database is the one in tmp_path/home too
        report = uploads.import_folder(s, on, str(allowed / "set"), "server", user=LOCAL_USER)
    assert report.added == 6
    with Session() as s:
        assert s.scalar(select(Dataset.source)) == str((allowed / "set").resolve())
