from __future__ import annotations

import io
import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from core.access.accounts import LOCAL_USER
from core.data.datasets import (
    delete_dataset,
    get_dataset,
    image_path,
    list_datasets,
)
from core.data.decoding import load_rgb
from core.data.ingest import ingest
from core.errors import UserError
from core.store import consistency
from core.store.db import Dataset, Image, Run, RunStatus, SkippedFile
from tests.synthetic import synthetic_image, write_dataset

# --- helpers ---------------------------------------------------------------------------------


def run_ingest(Session, settings, source, name="ds", **kwargs):
    with Session.begin() as s:
        return ingest(s, settings, source, name, **{"user": LOCAL_USER, **kwargs})


def count(Session, model) -> int:
    with Session() as s:
        return s.scalar(select(func.count()).select_from(model))


def stored_files(settings) -> list[Path]:
    if not settings.images_dir.exists():
        return []
    return sorted(p for p in settings.images_dir.rglob("*") if p.is_file())


def get_dataset_classes(Session, name="ds") -> list[str]:
    with Session() as s:
        return get_dataset(s, name).classes


def images(Session) -> list[Image]:
    with Session() as s:
        return list(s.scalars(select(Image).order_by(Image.original_name)))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, with almost no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def encoded(im: PILImage.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def png_bytes(label="CLL", index=0, size=(64, 48)) -> bytes:
    return encoded(synthetic_image(label, index, size), "PNG")


def write_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def good_entries(prefix: str = "") -> list[tuple[str, bytes]]:
    return [(f"{prefix}{label}/{i:03d}.png", png_bytes(label, i)) for label in ("CLL", "FL") for i in range(2)]


def assert_nothing_stored(Session, settings) -> None:
    assert count(Session, Dataset) == 0
    assert count(Session, Image) == 0
    assert stored_files(settings) == []
    assert not settings.tmp_dir.exists() or list(settings.tmp_dir.iterdir()) == []


# --- formats and modes -----------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".tif", ".tiff", ".png", ".jpg", ".bmp"])
def test_ingest_each_format(tmp_path, settings, Session, ext):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=ext)
    report = run_ingest(Session, settings, src)

    assert (report.added, report.already_present, report.skipped) == (4, 0, [])
    assert report.class_counts == {"CLL": 2, "FL": 2}
    for img in images(Session):
        path = image_path(settings, img)
        assert path.read_bytes() == (src / img.original_name).read_bytes()  # original bytes kept
        assert path.name.startswith(img.sha256)
        rgb = load_rgb(path)
        assert rgb.mode == "RGB" and rgb.size == (64, 48) == (img.width, img.height)


def _image_in_mode(mode: str, index: int) -> PILImage.Image:
    base = synthetic_image("CLL", index)
    if mode == "RGBA":
        rgba = base.convert("RGBA")
        rgba.putalpha(128)
        return rgba
    if mode in ("I;16", "I;16B"):
        a = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype("<u2" if mode == "I;16" else ">u2")
        return PILImage.fromarray(a)
    return base.convert(mode)


@pytest.mark.parametrize(
    "mode, ext",
    [
        ("RGBA", ".png"),
        ("LA", ".png"),
        ("L", ".png"),
        ("P", ".png"),
        ("1", ".png"),
        ("I;16", ".png"),
        ("I;16", ".tif"),
        ("I;16B", ".tif"),
        ("CMYK", ".jpg"),
        ("CMYK", ".tif"),
    ],
)
def test_ingest_each_mode_loads_as_rgb(tmp_path, settings, Session, mode, ext):
    src = tmp_path / "src"
    for label in ("CLL", "FL"):
        (src / label).mkdir(parents=True)
    for i in range(2):
        im = _image_in_mode(mode, i)
        assert im.mode == mode
        im.save(src / "CLL" / f"{i}{ext}")
        synthetic_image("FL", i).save(src / "FL" / f"{i}.png")

    report = run_ingest(Session, settings, src)

    assert report.added == 4 and report.skipped == []
    cll = [img for img in images(Session) if img.label == "CLL"]
    assert {img.mode for img in cll} == {mode}
    for img in cll:
        rgb = load_rgb(image_path(settings, img))
        assert rgb.mode == "RGB" and rgb.size == (64, 48)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 40000, 65535, 257]] * 4, dtype=np.uint16)
    PILImage.fromarray(a).save(tmp_path / "x.tif")
    rgb = np.asarray(load_rgb(tmp_path / "x.tif"))
    assert rgb[0, :, 0].tolist() == [0, 156, 255, 1]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_transparent_pixels_become_white(tmp_path):
    im = PILImage.new("RGBA", (4, 4), (10, 20, 30, 0))
    im.putpixel((0, 0), (10, 20, 30, 255))
    im.save(tmp_path / "x.png")
    rgb = load_rgb(tmp_path / "x.png")
    assert rgb.getpixel((1, 1)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) == (10, 20, 30)


def test_load_rgb_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(png_header_only(5000, 5000))
    with pytest.raises(UserError, match="too many pixels"):
        load_rgb(tmp_path / "x.png", max_pixels=1_000_000)
    (tmp_path / "y.png").write_text("hello")
    with pytest.raises(UserError, match="y.png: not an image"):
        load_rgb(tmp_path / "y.png")


# --- bad files -------------------------------------------------------------------------------


def _write_bad(path_no_ext: Path, kind: str) -> str:
    """Writes a bad file; returns its name."""
    good = png_bytes("CLL", 99)
    if kind == "empty":
        name, data = "empty.png", b""
    elif kind == "text":
        name, data = "notes.txt", b"not an image"
    elif kind == "random":
        name, data = "noise.png", np.random.default_rng(0).bytes(500)
    elif kind == "truncated_png":
        name, data = "cut.png", good[: len(good) // 2]
    elif kind == "truncated_jpg":
        name, data = "cut.jpg", encoded(synthetic_image("CLL", 98), "JPEG")[:400]
    elif kind == "small":
        name, data = "small.png", png_bytes("CLL", 97, size=(20, 200))
    elif kind == "bomb":  # over settings' 100 MP, under PIL's own hard limit
        name, data = "bomb.png", png_header_only(12_000, 12_000)
    elif kind == "huge_bomb":  # over PIL's hard limit: DecompressionBombError at open
        name, data = "huge.png", png_header_only(60_000, 60_000)
    else:
        raise AssertionError(kind)
    (path_no_ext / name).write_bytes(data)
    return name


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "empty file"),
        ("text", "not an image"),
        ("random", "not an image"),
        ("truncated_png", "corrupt"),
        ("truncated_jpg", "corrupt"),
        ("small", "too small"),
        ("bomb", "too many pixels"),
        ("huge_bomb", "too many pixels"),
    ],
)
def test_bad_file_is_skipped_with_reason(tmp_path, settings, Session, kind, reason):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=".png")
    name = _write_bad(src / "CLL", kind)

    report = run_ingest(Session, settings, src)

    assert report.added == 4
    assert len(report.skipped) == 1
    path, why = report.skipped[0]
    assert path == f"CLL/{name}" and why.startswith(reason), why
    with Session() as s:
        rows = s.scalars(select(SkippedFile)).all()
        assert [(r.path, r.reason) for r in rows] == report.skipped


def test_os_junk_is_ignored_and_hidden_folders_are_listed(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=".png")
    (src / "CLL" / ".DS_Store").write_bytes(b"junk")
    (src / "CLL" / "._000.png").write_bytes(b"junk")
    (src / "__MACOSX" / "CLL").mkdir(parents=True)
    (src / "__MACOSX" / "CLL" / "._000.png").write_bytes(b"junk")
    (src / ".hidden").mkdir()

    report = run_ingest(Session, settings, src)

    assert report.added == 4 and report.skipped == [(".hidden/", "hidden folder")]
    assert get_dataset_classes(Session) == ["CLL", "FL"]


def test_nested_output_folder_is_skipped(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=".png")
    (src / "CLL" / "output").mkdir()
    synthetic_image("CLL", 50).save(src / "CLL" / "output" / "CLL_original_000.png_aug.png")

    report = run_ingest(Session, settings, src)

    assert report.added == 4
    assert report.skipped == [
        ("CLL/output/", "sub-folder skipped: only files directly inside a class folder are taken")
    ]
    assert not any("output" in img.original_name for img in images(Session))


def test_progress_is_reported(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=3, classes=("CLL", "FL"), ext=".png")
    calls = []
    run_ingest(Session, settings, src, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 6) for i in range(1, 7)]


# --- classes ---------------------------------------------------------------------------------


def test_single_class_is_refused(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL",), ext=".png")
    with pytest.raises(UserError, match="at least 2"):
        run_ingest(Session, settings, src)
    assert_nothing_stored(Session, settings)


def test_class_without_valid_images_is_left_out(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=".png")
    (src / "MCL").mkdir()
    (src / "MCL" / "bad.png").write_bytes(b"")

    report = run_ingest(Session, settings, src)

    assert report.class_counts == {"CLL": 2, "FL": 2}
    assert get_dataset_classes(Session) == ["CLL", "FL"]
    assert ("MCL/", "no valid image in this class folder; class left out") in report.skipped


def test_two_folders_but_one_with_images_is_refused(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL",), ext=".png")
    (src / "FL").mkdir()
    (src / "FL" / "bad.png").write_text("oops")
    with pytest.raises(UserError, match="need at least 2"):
        run_ingest(Session, settings, src)
    assert_nothing_stored(Session, settings)


# --- duplicates and re-ingest ----------------------------------------------------------------


def test_duplicate_within_class_is_stored_once(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=".png")
    shutil.copy(src / "CLL" / "000.png", src / "CLL" / "copy.png")

    report = run_ingest(Session, settings, src)

    assert report.added == 4
    assert report.duplicates == [("CLL/copy.png", "CLL/000.png")]
    assert len(stored_files(settings)) == 4
    with Session() as s:
        assert s.scalars(select(SkippedFile.reason)).all() == ["duplicate of CLL/000.png"]


def test_duplicate_across_classes_is_refused(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=".png")
    shutil.copy(src / "CLL" / "001.png", src / "FL" / "copy.png")

    with pytest.raises(UserError) as err:
        run_ingest(Session, settings, src)

    assert "CLL/001.png" in str(err.value) and "FL/copy.png" in str(err.value)
    assert_nothing_stored(Session, settings)


def test_reingest_is_idempotent_and_adds_new_files(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=3, classes=("CLL", "FL"), ext=".tif")
    (src / "FL" / "bad.tif").write_bytes(b"")
    first = run_ingest(Session, settings, src)
    files = stored_files(settings)

    again = run_ingest(Session, settings, src)
    assert (again.added, again.already_present) == (0, 6)
    assert again.dataset_id == first.dataset_id
    assert count(Session, Image) == 6 and count(Session, Dataset) == 1
    assert stored_files(settings) == files

    (src / "FL" / "bad.tif").unlink()
    synthetic_image("FL", 10).save(src / "FL" / "new.tif")
    more = run_ingest(Session, settings, src)
    assert (more.added, more.already_present) == (1, 6)
    assert more.class_counts == {"CLL": 3, "FL": 4}
    assert count(Session, SkippedFile) == 0  # the old report was replaced


def test_reingest_with_image_in_other_class_is_refused(tmp_path, settings, Session):
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"), ext=".png")
    run_ingest(Session, settings, src)
    shutil.move(src / "CLL" / "000.png", src / "FL" / "moved.png")

    with pytest.raises(UserError, match="FL/moved.png"):
        run_ingest(Session, settings, src)
    assert count(Session, Image) == 4


def test_new_class_into_existing_dataset_is_refused(tmp_path, settings, Session):
    run_ingest(Session, settings, write_dataset(tmp_path / "a", per_class=2, classes=("CLL", "FL")))
    with pytest.raises(UserError, match="MCL"):
        run_ingest(Session, settings, write_dataset(tmp_path / "b", per_class=2, classes=("FL", "MCL")))


# --- zips ------------------------------------------------------------------------------------


def test_zip_in_single_top_level_folder(tmp_path, settings, Session):
    entries = good_entries("lymphoma/") + [
        ("lymphoma/CLL/.DS_Store", b"junk"),
        ("__MACOSX/lymphoma/CLL/._000.png", b"junk"),
        ("lymphoma/README.txt", b"about"),
    ]
    zip_path = write_zip(tmp_path / "data.zip", entries)

    report = run_ingest(Session, settings, zip_path)

    assert report.added == 4
    assert report.skipped == [("README.txt", "not in a class folder")]
    assert {img.original_name for img in images(Session)} == {"CLL/000.png", "CLL/001.png", "FL/000.png", "FL/001.png"}
    assert list(settings.tmp_dir.iterdir()) == []  # extraction folder removed


def test_zip_with_backslash_separators(tmp_path, settings, Session):
    entries = [(name.replace("/", "\\"), data) for name, data in good_entries("lymphoma/")]
    report = run_ingest(Session, settings, write_zip(tmp_path / "win.zip", entries))
    assert report.class_counts == {"CLL": 2, "FL": 2}


def test_folder_in_single_top_level_folder(tmp_path, settings, Session):
    write_dataset(tmp_path / "src" / "wrapper" / "lymphoma", per_class=2, classes=("CLL", "FL"))
    report = run_ingest(Session, settings, tmp_path / "src")
    assert report.class_counts == {"CLL": 2, "FL": 2}


def _symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    "entry",
    [
        "../evil.png",
        "CLL/../../evil.png",
        "/tmp/evil.png",
        "C:/evil.png",
        _symlink_entry("CLL/link.png"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "drive", "symlink"],
)
def test_unsafe_zip_is_refused_whole(tmp_path, settings, Session, entry):
    data = b"/etc/passwd" if isinstance(entry, zipfile.ZipInfo) else png_bytes("CLL", 9)
    zip_path = write_zip(tmp_path / "evil.zip", good_entries() + [(entry, data)])
    name = entry.filename if isinstance(entry, zipfile.ZipInfo) else entry

    with pytest.raises(UserError) as err:
        run_ingest(Session, settings, zip_path)

    assert name in str(err.value)
    assert_nothing_stored(Session, settings)
    assert not (tmp_path / "evil.png").exists()


def test_damaged_zip_member_is_refused(tmp_path, settings, Session):
    zip_path = write_zip(tmp_path / "data.zip", good_entries())
    raw = bytearray(zip_path.read_bytes())
    target = png_bytes("FL", 1)
    at = bytes(raw).index(target[100:140])  # stored uncompressed: flip bytes in the member data
    raw[at : at + 10] = bytes(b ^ 0xFF for b in raw[at : at + 10])
    zip_path.write_bytes(bytes(raw))

    with pytest.raises(UserError, match="damaged"):
        run_ingest(Session, settings, zip_path)
    assert_nothing_stored(Session, settings)


@pytest.mark.parametrize("kind", ["not_zip", "truncated", "empty", "missing"])
def test_bad_zip_source(tmp_path, settings, Session, kind):
    path = tmp_path / "data.zip"
    if kind == "not_zip":
        path.write_text("hello")
        expected = "not a zip file"
    elif kind == "truncated":
        write_zip(path, good_entries())
        path.write_bytes(path.read_bytes()[:300])
        expected = "not a zip file"
    elif kind == "empty":
        write_zip(path, [])
        expected = "empty"
    else:
        expected = "not found"

    with pytest.raises(UserError, match=expected):
        run_ingest(Session, settings, path)
    assert_nothing_stored(Session, settings)


def test_zip_over_size_cap_is_refused(tmp_path, settings, Session):
    small = replace(settings, max_unpacked_mb=1000 / 1024**2)  # 1000 bytes
    zip_path = write_zip(tmp_path / "data.zip", good_entries())
    with pytest.raises(UserError, match="more than the MAX_UNPACKED_MB limit"):
        run_ingest(Session, small, zip_path)
    assert_nothing_stored(Session, settings)


# --- groups ----------------------------------------------------------------------------------


def _grouped_source(root: Path) -> Path:
    for label in ("CLL", "FL"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            synthetic_image(label, i).save(root / label / f"{label.lower()}_{10 + i // 2}_{i}.png")
    return root


def test_groups_from_csv(tmp_path, settings, Session):
    src = _grouped_source(tmp_path / "src")
    rows = ["file,group"]
    rows += [f"CLL/cll_{10 + i // 2}_{i}.png,p{i // 2}" for i in range(4)]  # relative paths
    rows += [f"fl_{10 + i // 2}_{i}.png,q{i // 2}" for i in range(4)]  # bare names
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")

    run_ingest(Session, settings, src, groups_csv=tmp_path / "groups.csv")

    groups = {img.original_name: img.group for img in images(Session)}
    assert groups["CLL/cll_10_0.png"] == "p0" and groups["CLL/cll_11_3.png"] == "p1"
    assert groups["FL/fl_10_1.png"] == "q0" and groups["FL/fl_11_2.png"] == "q1"


def test_groups_csv_must_cover_every_image(tmp_path, settings, Session):
    src = _grouped_source(tmp_path / "src")
    (tmp_path / "groups.csv").write_text("file,group\nCLL/cll_10_0.png,p0\n")
    with pytest.raises(UserError, match="no group for 7 image"):
        run_ingest(Session, settings, src, groups_csv=tmp_path / "groups.csv")
    (tmp_path / "bad.csv").write_text("name,patient\nx,y\n")
    with pytest.raises(UserError, match="file,group"):
        run_ingest(Session, settings, src, groups_csv=tmp_path / "bad.csv")
    assert_nothing_stored(Session, settings)


@pytest.mark.parametrize("pattern", [r"_(\d{2})_", r"^(?P<label>[^/]+)/\w+?_(?P<group>\d{2})"])
def test_groups_from_pattern(tmp_path, settings, Session, pattern):
    src = _grouped_source(tmp_path / "src")
    run_ingest(Session, settings, src, group_pattern=pattern)
    groups = {img.original_name: img.group for img in images(Session)}
    assert groups["CLL/cll_10_1.png"] == "10" and groups["FL/fl_11_3.png"] == "11"


@pytest.mark.parametrize(
    "pattern, message",
    [("([unclosed", "not a valid regular expression"), (r"\d+", "capture group"), (r"^CLL/(\w+)", "finds no group")],
)
def test_bad_group_pattern(tmp_path, settings, Session, pattern, message):
    src = _grouped_source(tmp_path / "src")
    with pytest.raises(UserError, match=message):
        run_ingest(Session, settings, src, group_pattern=pattern)
    assert_nothing_stored(Session, settings)


def test_reingest_updates_groups(tmp_path, settings, Session):
    src = _grouped_source(tmp_path / "src")
    run_ingest(Session, settings, src)
    assert {img.group for img in images(Session)} == {None}
    report = run_ingest(Session, settings, src, group_pattern=r"_(\d{2})_")
    assert report.added == 0
    assert {img.group for img in images(Session)} == {"10", "11"}


# --- listing and deleting --------------------------------------------------------------------


def test_get_and_list_datasets(tmp_path, settings, Session):
    with Session() as s:
        with pytest.raises(UserError, match="none yet"):
            get_dataset(s, "nope")
    src = write_dataset(tmp_path / "src", per_class=2, classes=("CLL", "FL"))
    run_ingest(Session, settings, src, name="b")
    run_ingest(Session, settings, src, name="a")
    with Session() as s:
        assert [d.name for d in list_datasets(s)] == ["a", "b"]
        with pytest.raises(UserError, match="Known datasets: a, b"):
            get_dataset(s, "nope")


def test_delete_dataset_keeps_shared_files(tmp_path, settings, Session):
    src_a = write_dataset(tmp_path / "a", per_class=2, classes=("CLL", "FL"))
    src_b = write_dataset(tmp_path / "b", per_class=1, classes=("CLL", "MCL"))  # CLL/000 is shared
    run_ingest(Session, settings, src_a, name="a")
    run_ingest(Session, settings, src_b, name="b")
    assert len(stored_files(settings)) == 5
    with Session.begin() as s:  # a finished run of "a", with its folder
        run = Run(dataset_id=get_dataset(s, "a").id, experiment="e", config={}, seed=0, status=RunStatus.succeeded)
        s.add(run)
        s.flush()
        run_folder = settings.runs_dir / str(run.id)
    run_folder.mkdir(parents=True)
    (run_folder / "train.log").write_text("log")

    # A rolled-back delete keeps rows and files.
    with Session() as s:
        delete_dataset(s, settings, "a", user=LOCAL_USER)
        s.rollback()
    assert len(stored_files(settings)) == 5 and count(Session, Image) == 6 and run_folder.is_dir()

    with Session.begin() as s:
        delete_dataset(s, settings, "a", user=LOCAL_USER)
    assert not run_folder.exists() and count(Session, Run) == 0  # the run's files go with its row

    left = images(Session)
    assert {img.original_name for img in left} == {"CLL/000.tif", "MCL/000.tif"}
    assert stored_files(settings) == sorted(image_path(settings, img) for img in left)
    assert count(Session, SkippedFile) == 0
    report = consistency.check(Session, settings, deep=True)  # the files and the rows still agree
    assert report.clean, report.format()
    with Session() as s:
        with pytest.raises(UserError, match="Known datasets: b"):
            get_dataset(s, "a")
        with pytest.raises(UserError):
            delete_dataset(s, settings, "a", user=LOCAL_USER)
