"""What ingest and uploads refuse, and what they cost: zip bombs and entry counts (MAX_UNPACKED_MB,
MAX_ZIP_ENTRIES, compression ratio, MAX_DISK_GB counting APP_HOME/tmp), the memory a huge image
takes to decode, links that leave the imported folder, hidden files, a full disk, names longer
than the database stores, and damaged weights files. Each refusal is a UserError in plain words."""

from __future__ import annotations

import errno
import io
import json
import shutil
import sqlite3
import struct
import subprocess
import sys
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import ImageFile
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session as OrmSession

from core.__main__ import main
from core.access import limits
from core.access.accounts import EDITOR, LOCAL_USER, User
from core.config import load_settings
from core.data import uploads
from core.data.decoding import load_rgb
from core.data.ingest import ingest
from core.errors import UserError
from core.jobs import runs
from core.store import files
from core.store.db import Dataset, Image, Run, SkippedFile
from core.store.engine import make_sessionmaker
from core.training.presets import save_preset
from core.training.run_config import RunConfig
from core.transforms.augment import AugmentParams
from tests.synthetic import synthetic_image, write_dataset

REPO = Path(__file__).resolve().parents[1]
MB = 1024**2


def with_env(settings, **env: str):
    """Settings on the same APP_HOME and database, with some settings given."""
    return load_settings({"APP_HOME": str(settings.app_home), "DATABASE_URL": settings.database_url, **env})


def do_ingest(Session, settings, source, name="ds", **kwargs):
    with Session.begin() as s:
        return ingest(s, settings, source, name, **{"user": LOCAL_USER, **kwargs})


def count(Session, model) -> int:
    with Session() as s:
        return s.scalar(select(func.count()).select_from(model))


def png(label: str = "CLL", i: int = 0) -> bytes:
    buf = io.BytesIO()
    synthetic_image(label, i).save(buf, "PNG")
    return buf.getvalue()


def zip_file(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def good(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{label}/{i}.png": png(label, i) for label in ("CLL", "FL") for i in range(2)}


@pytest.fixture
def kept_tmp(settings, monkeypatch):
    """Leave unpacked uploads under APP_HOME/tmp in place, so a test can measure what was written;
    returns a function giving the bytes there."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not Path(path).resolve().is_relative_to(settings.tmp_dir.resolve()):
            real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return lambda: sum(p.stat().st_size for p in settings.tmp_dir.rglob("*") if p.is_file())


@pytest.fixture
def opened_entries(monkeypatch):
    """The names of the zip entries read (unpacked), in order."""
    names: list[str] = []
    real = zipfile.ZipFile.open

    def spy(self, member, mode="r", *args, **kwargs):
        if mode == "r":  # not the writes that make a test's zip
            names.append(member.filename if isinstance(member, zipfile.ZipInfo) else member)
        return real(self, member, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return names


# --- zips: unpacked size, entry count, compression ratio, room on the disk -----------------------


def test_zip_over_max_unpacked_mb_is_refused_before_unpacking(tmp_path, settings, Session, kept_tmp):
    bomb = zip_file(tmp_path / "bomb.zip", {**good(), "CLL/zeros.tif": bytes(5 * MB)})
    assert bomb.stat().st_size < 100_000
    small = with_env(settings, MAX_UNPACKED_MB="1")
    with pytest.raises(
        UserError,
        match=r"bomb\.zip unpacks to 5\.0 MB or more, more than the MAX_UNPACKED_MB "
        r"limit of 1 MB\..*Nothing was ingested",
    ):
        do_ingest(Session, small, bomb)
    assert kept_tmp() < 1 * MB
    assert count(Session, Dataset) == 0


def test_zip_entry_that_compresses_like_a_bomb_is_refused(tmp_path, settings, Session, kept_tmp, opened_entries):
    bomb = zip_file(tmp_path / "bomb.zip", {**good(), "CLL/zeros.tif": bytes(5 * MB)})
    with pytest.raises(
        UserError,
        match=r"entry 'CLL/zeros\.tif' would unpack from [\d,]+ to 5,242,880 bytes "
        r"\([\d,]+ times\), more than the 100 times",
    ):
        do_ingest(Session, settings, bomb)  # the default settings
    assert opened_entries == [] and kept_tmp() == 0


def test_zip_with_more_entries_than_max_zip_entries_is_refused_before_unpacking(
    tmp_path, settings, Session, opened_entries
):
    entries = {**good(), **{f"CLL/{i}.txt": b"x" for i in range(2000)}}
    many = zip_file(tmp_path / "many.zip", entries)
    with pytest.raises(
        UserError,
        match=r"many\.zip holds 2,004 files and folders, more than the MAX_ZIP_ENTRIES "
        r"limit of 100\.",
    ):
        do_ingest(Session, with_env(settings, MAX_ZIP_ENTRIES="100"), many)
    assert opened_entries == []
    assert count(Session, Dataset) == 0 and count(Session, SkippedFile) == 0


def test_max_zip_entries_defaults_a_little_above_max_images_per_dataset():
    assert load_settings({"APP_HOME": "/tmp/x"}).max_zip_entries == 21_000
    assert load_settings({"APP_HOME": "/tmp/x", "MAX_IMAGES_PER_DATASET": "500"}).max_zip_entries == 1500
    assert load_settings({"APP_HOME": "/tmp/x", "MAX_ZIP_ENTRIES": "7"}).max_zip_entries == 7
    assert load_settings({"APP_HOME": "/tmp/x"}).max_unpacked_mb == 20_480


def test_unpacking_is_counted_against_max_disk_gb_before_it_starts(tmp_path, settings, Session, opened_entries):
    noise = np.random.default_rng(0).bytes(300_000)  # does not compress
    data = zip_file(tmp_path / "data.zip", {**good(), "CLL/noise.bin": noise})
    used = limits.disk_usage(settings)
    cap = with_env(settings, MAX_DISK_GB=str((used + 200_000) / 1e9))
    with pytest.raises(UserError, match=r"unpacking data\.zip would add 0\.00 GB, more than the MAX_DISK_GB"):
        do_ingest(Session, cap, data)
    assert opened_entries == []


def test_files_under_tmp_count_against_max_disk_gb(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=1, classes=("CLL", "FL"))
    database = sum(p.stat().st_size for p in settings.app_home.glob("app.db*"))
    cap = with_env(settings, MAX_DISK_GB=str((database + 40_000) / 1e9))  # room for the two images
    settings.tmp_dir.mkdir(parents=True)
    (settings.tmp_dir / "upload-being-unpacked.zip").write_bytes(bytes(50_000))
    with pytest.raises(UserError, match=r"uses [\d.]+ GB, more than the MAX_DISK_GB limit"):
        do_ingest(Session, cap, src)
    (settings.tmp_dir / "upload-being-unpacked.zip").unlink()
    assert do_ingest(Session, cap, src).added == 2


def test_zip_entry_larger_than_its_header_says_writes_no_more_than_declared(tmp_path, settings, Session, kept_tmp):
    path = zip_file(tmp_path / "liar.zip", {**good(), "CLL/zeros.tif": bytes(5 * MB)})
    raw = bytearray(path.read_bytes())
    for signature, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local and central headers
        start = 0
        while (start := raw.find(signature, start)) >= 0:
            name_at = start + (30 if signature == b"PK\x03\x04" else 46)
            if raw[name_at : name_at + 13] == b"CLL/zeros.tif":
                raw[start + at : start + at + 4] = struct.pack("<I", 2000)  # claims 2,000 bytes
            start += 4
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="liar.zip"):
        do_ingest(Session, settings, path)
    assert kept_tmp() < 100_000


# --- decoding: the app's pixel limit, and memory bounded by it -----------------------------------


def png_header(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_max_image_pixels_is_the_only_pixel_limit(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    big.write_bytes(png_header(20_000, 20_000))  # 400 MP, above PIL's own limit of about 179 MP
    with pytest.raises(
        UserError,
        match=r"^big\.png: too many pixels: 20000x20000 is more than 100,000,000 "
        r"\(MAX_IMAGE_PIXELS\)$",
    ):
        load_rgb(big, max_pixels=100_000_000)

    # Allowed by the setting: the header check lets it through to decoding (stopped here, so the
    # test allocates nothing near 400 MP).
    def stop(self):
        raise OSError("decoding started")

    monkeypatch.setattr(ImageFile.ImageFile, "load", stop)
    with pytest.raises(UserError, match="decoding started"):
        load_rgb(big, max_pixels=500_000_000)


def png16_zeros_and_ramps(path: Path, width: int, height: int) -> Path:
    """A 16-bit grey PNG written row by row (never held in memory whole): a few hundred kB that
    decode to 2 bytes a pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + (bytes(range(256)) * (2 * width // 256 + 1))[: 2 * width]
    z = zlib.compressobj(1)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


MEASURE = """
import json, resource, sys
from pathlib import Path
from core.config import load_settings
from core.data.decoding import load_rgb
from core.access.accounts import LOCAL_USER
from core.data.ingest import ingest
from core.store.engine import make_sessionmaker
from tests.synthetic import write_dataset

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

src, home, big = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
write_dataset(src, per_class=1, classes=("CLL", "FL"))
settings = load_settings({"APP_HOME": str(home)})
Session = make_sessionmaker(settings.database_url)
base = peak_mb()
with Session.begin() as s:
    report = ingest(s, settings, src, "big", user=LOCAL_USER)
ingest_peak = peak_mb() - base
image = load_rgb(big, max_pixels=settings.max_image_pixels)
print(json.dumps({"added": report.added, "skipped": report.skipped, "size": image.size,
                  "ingest_mb": ingest_peak, "load_mb": peak_mb() - base}))
"""


def test_decoding_a_16_bit_100_megapixel_png_is_bounded_in_memory(tmp_path):
    src = tmp_path / "src"
    (src / "CLL").mkdir(parents=True)
    big = png16_zeros_and_ramps(src / "CLL" / "big.png", 10_000, 10_000)  # 100 MP: the default limit
    assert big.stat().st_size < 2 * MB
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(src), str(tmp_path / "home"), str(big)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["added"] == 3 and result["skipped"] == [] and result["size"] == [10_000, 10_000]
    # Ingest holds the decoded frame (2 bytes a pixel); the RGB image returned for prediction
    # takes 4 (PIL's layout), and converting to it never more than 8 in all.
    assert result["ingest_mb"] < 300, result
    assert result["load_mb"] < 800, result


def test_cli_predict_checks_max_image_pixels(tmp_path, monkeypatch, capsys):
    import core.inference.engine

    monkeypatch.setenv("APP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "1000")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    stub = SimpleNamespace(
        classes=["CLL", "FL"], temperature=None, probabilities=lambda images: np.full((len(images), 2), 0.5)
    )
    # The model is found first (the run's predictor, here a stub); then the image is refused on its header.
    monkeypatch.setattr(core.inference.engine, "get_predictor", lambda *args, **kwargs: stub)
    image = tmp_path / "x.png"
    image.write_bytes(png())  # 64 x 48 = 3,072 pixels
    assert main(["predict", "--run", "1", str(image)]) == 2
    assert "x.png: too many pixels: 64x48 is more than 1,000 (MAX_IMAGE_PIXELS)" in capsys.readouterr().err


# --- links out of the imported folder --------------------------------------------------------


@pytest.fixture
def linked_source(tmp_path):
    """An allowed folder whose class folder CLL holds a link to an image outside it (and one to an
    image inside), beside a class folder ETC that is a link to a folder outside (holding passwd)."""
    allowed = tmp_path / "allowed"
    src = write_dataset(allowed / "set", per_class=2, classes=("CLL", "FL"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    (outside / "shadow").write_text("root:!:1")
    synthetic_image("CLL", 99).save(outside / "secret.tif")
    (src / "ETC").symlink_to(outside)
    (src / "CLL" / "secret.tif").symlink_to(outside / "secret.tif")
    (src / ".store").mkdir()
    synthetic_image("CLL", 50).save(src / ".store" / "kept.tif")
    (src / "CLL" / "inside.tif").symlink_to(src / ".store" / "kept.tif")  # stays inside: followed
    return allowed, src


@pytest.mark.parametrize("entry", ["cli", "server"])
def test_links_that_leave_the_imported_folder_are_not_followed(linked_source, settings, Session, entry):
    allowed, src = linked_source
    if entry == "server":
        with Session.begin() as s:
            report = uploads.import_folder(
                s, with_env(settings, IMPORT_ROOTS=str(allowed)), str(src), "ds", user=LOCAL_USER
            )
    else:
        report = do_ingest(Session, settings, src)
    reasons = dict(report.skipped)
    assert reasons["ETC"] == "link leaves the imported folder"
    assert reasons["CLL/secret.tif"] == "link leaves the imported folder"
    assert not any("passwd" in p or "shadow" in p or p.startswith("ETC/") for p, _ in report.skipped)
    with Session() as s:
        dataset = s.scalar(select(Dataset))
        assert dataset.classes == ["CLL", "FL"]
        assert sorted((f.path, f.reason) for f in dataset.skipped) == sorted(report.skipped)
        assert sorted(i.original_name for i in dataset.images) == [
            "CLL/000.tif",
            "CLL/001.tif",
            "CLL/inside.tif",
            "FL/000.tif",
            "FL/001.tif",
        ]


def test_a_wrapper_folder_that_links_outside_is_not_descended_into(tmp_path, settings, Session):
    outside = write_dataset(tmp_path / "outside" / "lymphoma", per_class=1, classes=("CLL", "FL"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lymphoma").symlink_to(outside)
    with pytest.raises(UserError, match=r"Found 0 class folder\(s\)"):
        do_ingest(Session, settings, tmp_path / "src")
    assert count(Session, Image) == 0


# --- hidden files ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_hidden_files_are_listed_and_os_junk_is_not(tmp_path, settings, Session, kind):
    entries = {
        **good("lymphoma/"),
        "lymphoma/CLL/.secret.png": png("CLL", 9),
        "lymphoma/.git/config": b"[core]",
        "lymphoma/CLL/.DS_Store": b"junk",
        "lymphoma/CLL/._0.png": b"junk",
        "__MACOSX/lymphoma/CLL/._0.png": b"junk",
    }
    if kind == "zip":
        source = zip_file(tmp_path / "data.zip", entries)
    else:
        source = tmp_path / "src"
        for name, data in entries.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
    report = do_ingest(Session, settings, source)
    assert report.added == 4
    assert sorted(report.skipped) == [(".git/", "hidden folder"), ("CLL/.secret.png", "hidden file")]


# --- a full disk -----------------------------------------------------------------------------


def disk_fills_after(monkeypatch, writes: int) -> None:
    """The atomic writer fails with ENOSPC, after `writes` files were written in full."""
    real = files.atomic_path
    done = [0]

    @contextmanager
    def atomic_path(target, **kwargs):
        with real(target, **kwargs) as tmp:
            yield tmp
            if done[0] >= writes:
                tmp.write_bytes(b"half")  # a partial file, which the writer removes
                raise OSError(errno.ENOSPC, "No space left on device")
            done[0] += 1

    monkeypatch.setattr(files, "atomic_path", atomic_path)


def stored(settings) -> list[Path]:
    return [p for p in settings.images_dir.rglob("*") if p.is_file()] if settings.images_dir.exists() else []


def test_full_disk_during_cli_ingest_is_one_error_line(tmp_path, settings, monkeypatch, capsys):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"))
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    disk_fills_after(monkeypatch, writes=2)  # two images stored, the third fails
    assert main(["ingest", str(src), "--name", "ds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: The disk is full: the images of dataset 'ds' could not be stored")
    assert not any("Traceback" in line for line in err)
    assert stored(settings) == []  # the two stored before the failure are removed again
    assert count(make_sessionmaker(settings.database_url), Dataset) == 0


@pytest.mark.parametrize("kind", ["zip", "files"])
def test_full_disk_while_writing_an_upload_is_a_user_error(tmp_path, settings, Session, monkeypatch, kind):
    disk_fills_after(monkeypatch, writes=0)
    with Session.begin() as s, pytest.raises(UserError, match="The disk is full: the upload"):
        if kind == "zip":
            data = zip_file(tmp_path / "up.zip", good()).read_bytes()
            uploads.ingest_zip(s, settings, data, "up.zip", "up", user=LOCAL_USER)
        else:
            uploads.ingest_files(
                s, settings, [("CLL", "a.png", png("CLL", 0)), ("FL", "b.png", png("FL", 0))], "up", user=LOCAL_USER
            )
    assert list(settings.tmp_dir.iterdir()) == [] and stored(settings) == []


def test_full_sqlite_database_is_a_user_error(tmp_path, settings, Session, monkeypatch):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"))

    def flush(self, *args, **kwargs):
        raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(OrmSession, "flush", flush)
    with pytest.raises(UserError, match="The disk is full"):
        do_ingest(Session, settings, src)
    monkeypatch.undo()
    assert count(Session, Dataset) == 0 and stored(settings) == []


# --- names longer than the database stores ---------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """(settings, sessionmaker) on SQLite, or on a fresh PostgreSQL database."""
    env = {"APP_HOME": str(tmp_path / "home")}
    if request.param == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    settings = load_settings(env)
    Session = make_sessionmaker(settings.database_url)
    yield settings, Session
    Session.kw["bind"].dispose()


def test_names_longer_than_the_columns_are_refused(tmp_path, db):
    settings, Session = db
    long = "n" * 201
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"))
    with pytest.raises(UserError, match="Dataset name 'n+\\.\\.\\.' is 201 characters long; names can be at most 200"):
        do_ingest(Session, settings, src, long)
    with pytest.raises(UserError, match="User name .* is 201 characters long"):
        do_ingest(Session, settings, src, user=User(long, EDITOR))
    groups = tmp_path / "groups.csv"
    groups.write_text("file,group\n" + "".join(f"{p.relative_to(src).as_posix()},{long}\n" for p in src.rglob("*.tif")))
    with pytest.raises(UserError, match="Group .* is 201 characters long"):
        do_ingest(Session, settings, src, groups_csv=groups)
    wide = write_dataset(tmp_path / "wide", per_class=1, classes=("CLL", "FL"))
    (wide / "FL").rename(wide / ("F" * 201))
    with pytest.raises(UserError, match="Class folder name 'F+\\.\\.\\.' is 201 characters long"):
        do_ingest(Session, settings, wide)
    assert count(Session, Dataset) == 0

    do_ingest(Session, settings, src)
    with Session.begin() as s, pytest.raises(UserError, match="User name .* is 201 characters long"):
        runs.create_runs(s, settings, RunConfig(dataset="ds", weights="none"), user=User(long, EDITOR))
    with Session.begin() as s, pytest.raises(UserError, match="Preset name .* is 201 characters long"):
        save_preset(s, long, AugmentParams())
    assert count(Session, Run) == 0


def test_cli_user_longer_than_the_column_is_refused(tmp_path, settings, monkeypatch, capsys):
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    src = write_dataset(tmp_path / "src", per_class=1, classes=("CLL", "FL"))
    assert main(["ingest", str(src), "--name", "ds", "--user", "u" * 300]) == 2
    assert "User name 'uuu" in capsys.readouterr().err
    assert count(make_sessionmaker(settings.database_url), Dataset) == 0


# --- weights files ---------------------------------------------------------------------------


def test_damaged_safetensors_weights_file_is_a_user_error(tmp_path, settings, monkeypatch, capsys):
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    from core.store.engine import make_sessionmaker
    from tests.synthetic import ingest_synthetic

    ingest_synthetic(tmp_path / "data", settings, make_sessionmaker(settings.database_url), 2, name="ds")
    bad = tmp_path / "densenet.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(["train", "--dataset", "ds", "--weights", str(bad)]) == 2
    assert f"error: Cannot read weights file {bad}" in capsys.readouterr().err
