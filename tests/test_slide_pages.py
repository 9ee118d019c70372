"""Whole-slide datasets on the Datasets page: a server folder of class folders of slides imported
through the form (tiled at the scale its fields give, each tile grouped by its slide), the slides
table, one slide's tiling drawn over its thumbnail (or over a blank canvas once the file is gone),
a slide name with Markdown and HTML in it shown as text, a damaged slide refusing the whole import;
and an uploaded zip of slides, tiled from a copy that is not kept.

Slides are small synthetic pyramidal TIFFs (tests/slides.py), tiled at 64 px and 1 µm per pixel
(SLIDE_TILE_PX, SLIDE_MPP, SLIDE_MAX_TILES set for the page) so that a few tiles each are quick.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.access.accounts import LOCAL_USER
from core.data import slide_views, uploads
from core.data.slide_ingest import SlideIngestReport
from core.store.db import Dataset, Image, Slide
from core.store.engine import make_sessionmaker
from pages._common import md_text
from tests.slides import Region, class_texture, write_slide
from tests.test_names_as_text import markdown_strings
from tests.test_pages import open_page, zip_of

HOSTILE = "**bold** <img src=x>.tif"  # a slide's file name: Markdown and HTML, both legal on the file system
SLIDES = {"CLL": ["cll-1.tif", "cll-2.tif"], "FL": ["fl-1.tif", HOSTILE]}
SCALE = {"SLIDE_TILE_PX": "64", "SLIDE_MPP": "1", "SLIDE_MAX_TILES": "3"}


@pytest.fixture(autouse=True)
def no_worker(monkeypatch):
    """No background worker is started by the pages under test."""
    from core.jobs import worker

    monkeypatch.setattr(worker, "ensure_worker", lambda settings: True)


def write_one(path: Path, label: str, index: int) -> None:
    """A 1024 x 768 slide at 0.5 µm per pixel, mostly `label`'s texture: shifted by `index` and tinted
    by position so that no two tiles anywhere are the same (identical tiles would be stored once)."""
    texture, shift = class_texture(label), 997 * index + 13

    def fill(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = texture(x + shift, y + shift, w, h).astype(np.int16)
        out[..., 0] += (np.arange(x, x + w) // 128)[None, :]
        out[..., 1] += (np.arange(y, y + h) // 128)[:, None] + index
        return np.clip(out, 0, 255).astype(np.uint8)

    write_slide(path, 1024, 768, [Region(64, 64, 896, 640, fill)], mpp=0.5, levels=2)


@pytest.fixture(scope="module")
def slide_source(tmp_path_factory) -> Path:
    """Two classes of two slides each, written once; tests copy them."""
    root = tmp_path_factory.mktemp("slides") / "wsi"
    for c, (label, names) in enumerate(SLIDES.items()):
        (root / label).mkdir(parents=True)
        for i, name in enumerate(names):
            write_one(root / label / name, label, 2 * c + i)
    return root


def import_through_page(monkeypatch, settings, folder: Path, name: str):
    """The Datasets page with IMPORT_ROOTS at `folder`'s parent, `folder` imported as dataset `name`."""
    monkeypatch.setenv("IMPORT_ROOTS", str(folder.parent))
    for key, value in SCALE.items():
        monkeypatch.setenv(key, value)
    at = open_page(monkeypatch, settings, "pages/dataset.py")
    at.segmented_control(key="ds_source").set_value("Folder on the server").run()
    shown = {key: at.number_input(key=key).value for key in ("ds_tile_px", "ds_tile_mpp", "ds_max_tiles")}
    assert shown == {"ds_tile_px": 64, "ds_tile_mpp": 1.0, "ds_max_tiles": 3}  # the server's settings
    assert at.number_input(key="ds_slide_mpp").value is None  # read from each slide's file
    at.text_input(key="ds_path").input(str(folder))
    at.text_input(key="ds_name").input(name).run()
    at.button(key="ds_add").click().run()
    assert not at.exception, at.exception
    return at


def tiling_chart(at) -> dict:
    (spec,) = [
        json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
        if json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("Tiles of")
    ]
    return spec


def boxes(spec: dict) -> int:
    """How many tile rectangles the figure draws (each a closed outline of 5 points and a gap)."""
    return sum(len(t["x"]) // 6 for t in spec["data"] if t.get("name", "").startswith("kept"))


def test_a_server_folder_of_slides_becomes_a_dataset_of_their_tiles(slide_source, settings, monkeypatch, tmp_path):
    folder = shutil.copytree(slide_source, tmp_path / "imports" / "wsi")
    at = import_through_page(monkeypatch, settings, folder, "slides")
    assert not at.error, [e.value for e in at.error]
    assert "4 slide(s) added, 12 tile(s) of 64 px at 1 µm per pixel (at most 3 a slide)" in at.success[0].value

    Session = make_sessionmaker(settings.database_url)
    with Session() as s:
        dataset = s.scalar(select(Dataset))
        assert (dataset.tile_px, dataset.tile_mpp) == (64, 1.0)
        rows = s.execute(select(Slide.file_name, Slide.source_path)).tuples().all()
        assert {n: p for n, p in rows} == {n: str(folder / label / n) for label, names in SLIDES.items() for n in names}
        by_group = dict(s.execute(select(Image.group, func.count()).group_by(Image.group)).tuples().all())
    assert by_group == {n: 3 for names in SLIDES.values() for n in names}  # each tile's group is its slide

    # The Browse tab: the slides table, the scale in the summary, one slide's tiles over its thumbnail.
    assert {m.label: m.value for m in at.metric}["Slides"] == "4"
    assert "scale: tiles of 64 px at 1 µm per pixel" in " ".join(c.value for c in at.caption)
    table = next(d.value for d in at.dataframe if "vendor" in d.value.columns)
    assert sorted(table["slide"]) == sorted(n for names in SLIDES.values() for n in names)
    assert list(table["tiles kept"]) == [3, 3, 3, 3] and list(table["size (px)"]) == ["1,024 × 768"] * 4
    assert (table["µm per pixel"] == "0.5").all() and (table["background"] > 0).all()
    spec = tiling_chart(at)
    assert spec["data"][0]["type"] == "image" and spec["data"][0]["source"].startswith("data:image/png;base64,")
    assert boxes(spec) == 3 and not any(t.get("name") == "the slide's outline" for t in spec["data"])

    # The name with Markdown and HTML in it: text in every element that renders Markdown, and in plotly.
    with Session() as s:
        hostile = next(x for x in slide_views.dataset_slides(s, "slides") if x.file_name == HOSTILE)
    at.selectbox(key="ds_slide").set_value(hostile.id).run()
    assert not at.exception
    spec = tiling_chart(at)
    assert "&lt;img src=x&gt;" in spec["layout"]["title"]["text"] and "<img" not in json.dumps(spec)
    texts = markdown_strings(at)
    assert not [where for where, value in texts if "**bold** <img" in value]
    assert any(md_text("**bold** <img src=x>") in value for _, value in texts)  # its tiles' captions

    # The file gone from the server: the same tiles on a blank canvas, and the caption says why.
    (folder / "FL" / HOSTILE).unlink()
    at.run()
    spec = tiling_chart(at)
    assert boxes(spec) == 3 and any(t.get("name") == "the slide's outline" for t in spec["data"])
    assert any("slide file is not on the server" in c.value for c in at.caption)


def test_a_damaged_slide_refuses_the_whole_import(slide_source, settings, monkeypatch, tmp_path):
    folder = shutil.copytree(slide_source, tmp_path / "imports" / "wsi")
    data = (folder / "FL" / "fl-1.tif").read_bytes()
    (folder / "FL" / "fl-3.tif").write_bytes(data[: len(data) // 2])  # cut short in a copy
    at = import_through_page(monkeypatch, settings, folder, "damaged")
    message = at.error[0].value
    assert message.startswith(md_text("FL/fl-3.tif: fl-3.tif is not a whole-slide image that can be read"))
    assert str(tmp_path) not in message and "Traceback" not in message and not at.success
    Session = make_sessionmaker(settings.database_url)
    with Session() as s:
        assert sum(s.scalar(select(func.count()).select_from(t)) for t in (Dataset, Image, Slide)) == 0
    assert not [p for p in settings.app_home.rglob("*") if p.is_file() and p.suffix == ".png"]  # no tile stored
    assert not list(settings.tmp_dir.iterdir())  # nor left in the work folder


def test_an_uploaded_zip_of_slides_is_tiled_from_a_copy_not_kept(slide_source, settings, tmp_path):
    Session = make_sessionmaker(settings.database_url)
    options = uploads.SlideOptions(tile_px=64, tile_mpp=1.0, max_tiles=2)
    seen = []
    with Session.begin() as s:
        report = uploads.ingest_zip(
            s,
            settings,
            zip_of(slide_source.parent),
            "scans.zip",
            "uploaded",
            slides=options,
            tile_progress=lambda done, total: seen.append((done, total)),
            user=LOCAL_USER,
        )
    assert isinstance(report, SlideIngestReport) and report.tiles_kept == 8 and seen[-1] == (4, 4)
    with Session() as s:
        assert s.scalar(select(Dataset.source)) == "upload scans.zip"
        assert set(s.scalars(select(Slide.source_path))) == {None}
        slides = slide_views.dataset_slides(s, "uploaded")
        assert slide_views.dataset_scale(s, "uploaded").words == "tiles of 64 px at 1 µm per pixel"
    assert slide_views.DatasetScale(None, 0.25).words == "0.25 µm per pixel"  # field images with a recorded mpp
    assert slide_views.DatasetScale(None, None).words is None
    assert not list(settings.tmp_dir.iterdir())  # the zip and its unpacked slides are gone
    picture = slide_views.tiling_picture(slides[0])
    assert picture.thumbnail is None and "was uploaded" in picture.note
    assert (picture.width, picture.height) == (1024, 768) and len(picture.clean + picture.pen + picture.blurry) == 2
