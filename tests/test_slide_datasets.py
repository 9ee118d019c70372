"""Datasets of whole-slide images (core/data/slide_ingest.py): slides tiled into a dataset whose tiles
are grouped by slide, all or nothing; the scale in the model file (core/slides/scale.py); results per
slide (core/evaluation/slides.py); the command line; a changed slide seen by the consistency check.
Slides are small synthetic pyramidal TIFFs (tests/slides.py), tiled small so that training is quick."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from core.__main__ import main
from core.access.accounts import LOCAL_USER
from core.config import load_settings
from core.data.slide_ingest import ingest_slides, is_slide_folder
from core.errors import UserError
from core.evaluation.slides import format_slide_report, slide_report
from core.inference.model_file import read_model
from core.slides.scale import ModelScale, model_scale, scale_meta
from core.slides.tiling import Tiling
from core.store.consistency import check, check_slide_sources
from core.store.db import Dataset, Image, Prediction, Run, Slide, SplitMember
from core.store.engine import make_sessionmaker
from core.store.runs import model_path
from core.training.run_config import RunConfig
from tests.slides import Region, class_texture, write_slide
from tests.synthetic import synthetic_image, train_runs

TILING = dict(tile_px=64, tile_mpp=1.0, max_tiles=12)


def slide(path: Path, label: str, index: int, *, mpp: float | None = 0.5) -> Path:
    """A 2000 x 1500 slide of `label`'s texture, shifted by `index` so that no two slides share a tile,
    and tinted by position (the 128 level-0 pixels of one tile here) so that no two tiles of one slide
    are the same: the texture alone repeats, and identical tiles would be stored once."""
    texture, shift = class_texture(label), 997 * index + 13

    def fill(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = texture(x + shift, y + shift, w, h).astype(np.int16)
        out[..., 0] += (np.arange(x, x + w) // 128)[None, :]
        out[..., 1] += (np.arange(y, y + h) // 128)[:, None]
        return np.clip(out, 0, 255).astype(np.uint8)

    region = Region(100, 100, 1800, 1300, fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_slide(path, 2000, 1500, [region], mpp=mpp, levels=2)


def slide_folder(root: Path, per_class: int, *, mpp: float | None = 0.5) -> Path:
    for c, label in enumerate(("CLL", "FL")):
        for i in range(per_class):
            slide(root / label / f"{label.lower()}-{i}.tif", label, c * per_class + i, mpp=mpp)
    return root


def stored_nothing(Session, settings) -> bool:
    with Session() as s:
        rows = sum(s.scalar(select(func.count()).select_from(t)) for t in (Dataset, Image, Slide))
    files = [p for p in settings.images_dir.rglob("*") if p.is_file()] if settings.images_dir.exists() else []
    work = list(settings.tmp_dir.iterdir()) if settings.tmp_dir.exists() else []
    return rows == 0 and not files and not work


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Six slides (3 CLL, 3 FL) ingested, 12 tiles each, and a run trained on their tiles (4 short epochs:
    enough to tell the two textures apart on every tile of a new slide)."""
    root = tmp_path_factory.mktemp("slide-dataset")
    settings = load_settings({"APP_HOME": str(root / "home"), "INFERENCE_ENGINE": "torch", "START_WORKER": "0"})
    Session = make_sessionmaker(settings.database_url)
    source = slide_folder(root / "slides", per_class=3)
    seen = []
    with Session.begin() as s:
        report = ingest_slides(
            s,
            settings,
            source,
            "wsi",
            progress=lambda d, t: seen.append((d, t)),
            **TILING,
            user=LOCAL_USER,
        )
    config = RunConfig(
        dataset="wsi",
        image_size=32,
        per_class=8,
        epochs=4,
        batch_size=8,
        lr=1e-3,
        weights="none",
        device="cpu",
        test_fraction=0.3,
        val_fraction=0.5,
    )
    (run_id,) = train_runs(Session, settings, config)
    return settings, Session, source, report, seen, run_id


def test_slides_become_tiles_grouped_by_their_slide(trained):
    settings, Session, source, report, seen, _ = trained
    assert seen == [(i, 6) for i in range(1, 7)]  # progress counts slides tiled
    assert report.ingest.added == report.tiles_kept == 6 * 12 and report.ingest.class_counts == {"CLL": 36, "FL": 36}
    with Session() as s:
        dataset = s.scalar(select(Dataset).where(Dataset.name == "wsi"))
        assert (dataset.tile_px, dataset.tile_mpp, dataset.groups_estimated) == (64, 1.0, False)
        assert dataset.source == str(source.resolve())  # not the removed work folder
        images = s.scalars(select(Image).where(Image.dataset_id == dataset.id)).all()
        slides = {r.file_name: r for r in s.scalars(select(Slide).where(Slide.dataset_id == dataset.id))}
    assert sorted(slides) == sorted(f"{c}-{i}.tif" for c in ("cll", "fl") for i in range(3))
    for image in images:  # each tile named for its slide and position, in its slide's group and class
        assert image.original_name.startswith(f"{image.label}/{Path(image.group).stem}__")
        assert slides[image.group].label == image.label
        assert (settings.app_home / image.stored_path).is_file()
    row = slides["cll-0.tif"]
    path = source / "CLL" / "cll-0.tif"
    assert (row.source_path, row.size_bytes, row.mpp, row.vendor) == (
        str(path.resolve()),
        path.stat().st_size,
        0.5,
        "generic-tiff",
    )
    assert (row.width, row.height, row.tiles_kept) == (2000, 1500, 12)
    tiling = Tiling.from_json(row.tiling)
    assert (tiling.tile_px, tiling.mpp, len(tiling.tiles), tiling.max_tiles) == (64, 1.0, 12, 12)
    assert not list(settings.tmp_dir.iterdir())  # the work folder is gone


def test_the_split_keeps_each_slide_on_one_side_and_the_model_knows_its_scale(trained):
    settings, Session, _, _, _, run_id = trained
    with Session() as s:
        run = s.get(Run, run_id)
        assert run.status.value == "succeeded", run.error
        members = s.execute(
            select(SplitMember.part, Image.group)
            .join(Image, Image.id == SplitMember.image_id)
            .where(SplitMember.split_id == run.split_id)
        ).all()
    parts: dict[str, set[str]] = {}
    for part, group in members:
        parts.setdefault(group, set()).add(part)
    assert len(parts) == 6 and all(len(p) == 1 for p in parts.values())
    assert {p for ps in parts.values() for p in ps} == {"train", "val", "test"}
    _, meta = read_model(model_path(settings, run_id))
    assert meta["scale"] == {"tile_px": 64, "mpp": 1.0}
    assert model_scale(meta) == ModelScale(tile_px=64, mpp=1.0)


def test_a_slide_is_judged_by_the_mean_of_its_tiles_probabilities(trained, monkeypatch, capsys):
    settings, Session, _, _, _, run_id = trained
    with Session() as s:
        run = s.get(Run, run_id)
        report = slide_report(s, run)
        rows = s.execute(
            select(Image.group, Image.label, Prediction.probabilities)
            .join(Image, Image.id == Prediction.image_id)
            .where(Prediction.run_id == run_id)
        ).all()
    by_slide: dict[str, list] = {}
    for group, label, probs in rows:
        by_slide.setdefault(group, []).append((label, probs))
    assert len(by_slide) == 2 and [r.slide for r in report.slides] == sorted(by_slide)  # one test slide a class
    classes = ["CLL", "FL"]
    for r in report.slides:
        probs = np.array([p for _, p in by_slide[r.slide]])
        assert r.probabilities == pytest.approx(tuple(probs.mean(axis=0)))
        assert r.predicted_class == classes[int(probs.mean(axis=0).argmax())]
        assert r.true_class == by_slide[r.slide][0][0] and r.n_tiles == len(probs)
        assert sum(r.tile_shares) == pytest.approx(1.0)
        assert r.tile_shares[0] == pytest.approx(float((probs.argmax(axis=1) == 0).mean()))
    assert report.n == 2 and report.confusion.sum() == 2
    assert report.accuracy == sum(r.true_class == r.predicted_class for r in report.slides) / 2
    text = format_slide_report(report)
    assert text.startswith("Per slide (mean of its tiles' probabilities)") and "2 test slides" in text
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["evaluate", str(run_id)]) == 0
    out = capsys.readouterr().out
    assert out.index("test samples") < out.index(text.splitlines()[0]) and report.slides[0].slide in out


def test_a_slide_without_mpp_is_refused_unless_it_is_given(tmp_path, settings, Session):
    source = slide_folder(tmp_path / "slides", per_class=1, mpp=None)
    with (
        pytest.raises(UserError, match=r"^cll-0\.tif has no microns per pixel; give it with --mpp"),
        Session.begin() as s,
    ):
        ingest_slides(s, settings, source, "no-mpp", **TILING, user=LOCAL_USER)
    assert stored_nothing(Session, settings)
    with Session.begin() as s:
        report = ingest_slides(s, settings, source, "no-mpp", mpp=0.5, **{**TILING, "max_tiles": 3}, user=LOCAL_USER)
    assert report.tiles_kept == 6
    with Session() as s:
        assert set(s.scalars(select(Slide.mpp))) == {0.5}


def test_a_cut_short_slide_stores_nothing(tmp_path, settings, Session):
    source = slide_folder(tmp_path / "slides", per_class=1)
    data = (source / "FL" / "fl-0.tif").read_bytes()
    (source / "FL" / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as e, Session.begin() as s:
        ingest_slides(s, settings, source, "cut", **TILING, user=LOCAL_USER)
    assert str(e.value).startswith("FL/cut.tif: cut.tif is not a whole-slide image that can be read")
    assert str(tmp_path) not in str(e.value)
    assert stored_nothing(Session, settings)


def test_a_slide_without_tissue_stores_nothing(tmp_path, settings, Session):
    source = slide_folder(tmp_path / "slides", per_class=1)
    write_slide(source / "FL" / "blank.tif", 2000, 1500, [], mpp=0.5, levels=2)  # glass only
    with pytest.raises(UserError, match=r"^FL/blank\.tif: no tissue was found on this slide"), Session.begin() as s:
        ingest_slides(s, settings, source, "blank", **TILING, user=LOCAL_USER)
    assert stored_nothing(Session, settings)


def test_the_command_line_ingests_slides_and_images_with_their_scale(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("APP_HOME", str(home))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    source = slide_folder(tmp_path / "slides", per_class=1)
    args = ["--tile-px", "64", "--tile-mpp", "1", "--max-tiles", "4"]
    assert main(["ingest", str(source), "--name", "wsi", *args]) == 0
    out = capsys.readouterr().out
    assert "slide CLL/cll-0.tif: 4 tiles" in out and "2 slide(s) tiled, 8 tiles of 64 px at 1 microns per pixel" in out
    assert "dataset 'wsi': 8 added" in out

    data = (source / "FL" / "fl-0.tif").read_bytes()
    (source / "FL" / "fl-0.tif").unlink()
    (source / "FL" / "cut.svs").write_bytes(data[: len(data) // 3])
    assert main(["ingest", str(source), "--name", "cut", *args]) == 2
    err = capsys.readouterr().err.strip()  # the progress bar of the slide tiled before, then the error
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: cut.svs is not a whole-slide image that can be read"), err

    fields = tmp_path / "fields"
    for label in ("CLL", "FL"):
        (fields / label).mkdir(parents=True)
        for i in range(2):
            synthetic_image(label, i).save(fields / label / f"{i}.png")
    assert main(["ingest", str(fields), "--name", "fields", "--mpp", "0.25"]) == 0
    Session = make_sessionmaker(load_settings().database_url)
    with Session() as s:
        scales = (
            dict(s.execute(select(Dataset.name, Dataset.tile_px)).all()),
            dict(s.execute(select(Dataset.name, Dataset.tile_mpp)).all()),
        )
    assert scales == ({"wsi": 64, "fields": None}, {"wsi": 1.0, "fields": 0.25})  # and nothing of "cut"
    capsys.readouterr()
    assert main(["ingest", str(fields), "--name", "wsi"]) == 2  # images into a dataset of tiles
    assert "holds tiles of 64 px at 1 microns per pixel cut from slides" in capsys.readouterr().err


def test_a_folder_of_slides_and_images_is_refused(tmp_path):
    source = slide_folder(tmp_path / "slides", per_class=1)
    synthetic_image("FL", 0).save(source / "FL" / "field.png")
    with pytest.raises(
        UserError,
        match=r"holds both whole-slide images \(CLL/cll-0.tif.*\) and field images "
        r"\(FL/field.png\)",
    ):
        is_slide_folder(source)
    assert not is_slide_folder(tmp_path / "nothing.zip")


def test_the_check_sees_a_slide_changed_after_ingest_not_one_touched(tmp_path, settings, Session):
    source = slide_folder(tmp_path / "slides", per_class=1)
    with Session.begin() as s:
        ingest_slides(s, settings, source, "wsi", **{**TILING, "max_tiles": 2}, user=LOCAL_USER)
    path = source / "CLL" / "cll-0.tif"
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 60))  # touched: same bytes
    with Session() as s:
        dataset = s.scalar(select(Dataset))
        assert check_slide_sources(s, dataset) == []
        slide(path, "CLL", 5)  # replaced by another slide
        (source / "FL" / "fl-0.tif").unlink()
        found = {p.path: p.detail for p in check_slide_sources(s, dataset)}
    assert set(found) == {"CLL/cll-0.tif", "FL/fl-0.tif"}
    assert "changed since it was ingested" in found["CLL/cll-0.tif"] and "no longer there" in found["FL/fl-0.tif"]
    report = check(Session, settings)  # `python -m core check`
    assert [p.path for p in report.of_kind("slide_source")] == ["CLL/cll-0.tif", "FL/fl-0.tif"]
    assert not report.clean and not report.fixable


def test_model_scale_reads_only_a_tile_scale():
    assert model_scale({"scale": scale_meta(224, 0.5)}) == ModelScale(224, 0.5)
    for meta in (
        {},
        {"scale": scale_meta(None, 0.25)},
        {"scale": {"tile_px": "224", "mpp": 0.5}},
        {"scale": {"tile_px": 224, "mpp": float("nan")}},
        {"scale": [224, 0.5]},
    ):
        assert model_scale(meta) is None


def test_the_runs_page_shows_the_run_per_slide_beside_per_tile(trained, monkeypatch):
    from streamlit.testing.v1 import AppTest

    settings, Session, _, _, _, run_id = trained
    with Session() as s:
        report = slide_report(s, s.get(Run, run_id))
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page("pages/runs.py").run()
    at.selectbox(key="runs_selected").set_value(run_id).run()
    assert not at.exception, at.exception
    assert any(
        m.value.startswith("**Per slide (the mean of its tiles' probabilities)** · 2 test slides") for m in at.markdown
    )
    assert [c for c in at.get("plotly_chart") if "confusion matrix per slide" in c.proto.spec]
    (slides,) = [d.value for d in at.dataframe if "slide" in d.value.columns]
    assert list(slides["slide"]) == [r.slide for r in report.slides]
    assert list(slides["predicted"]) == [r.predicted_class for r in report.slides]


def test_a_run_trained_on_slide_tiles_gives_each_half_of_a_two_texture_slide_its_class(trained, tmp_path):
    """The run trained on the tiles of six slides, asked about a new slide with CLL's texture on the left,
    FL's on the right and glass around: at least 90% of each half's tiles go to its class, none to glass."""
    from core.inference import engine
    from core.slides.predict import predict_slide, slide_scale
    from tests.slides import two_region_slide
    from tests.test_slide_predict import inside

    settings, Session, _, _, _, run_id = trained
    with Session() as s:
        model = engine.get_predictor(s, settings, run_id, "cpu")
    path, left, right = two_region_slide(tmp_path / "two.tif", width=2560, height=1024, mpp=0.5)
    pred = predict_slide(model, path, scale=slide_scale(model), settings=settings, batch=16)
    side = pred.tiling.step_x  # 64 px at 1 um per pixel: 128 level-0 pixels
    on_left = [k for k, t in enumerate(pred.tiling.tiles) if inside(t.x, t.y, side, left)]
    on_right = [k for k, t in enumerate(pred.tiling.tiles) if inside(t.x, t.y, side, right)]
    assert side == 128 and len(on_left) == len(on_right) == 20
    assert len(on_left) + len(on_right) == pred.n_tiles  # no tile from the glass
    winners = pred.tile_predicted
    assert np.mean(winners[on_left] == 0) >= 0.9 and np.mean(winners[on_right] == 1) >= 0.9


def test_the_api_the_command_line_and_the_page_give_a_slide_trained_run_one_verdict(
    trained, tmp_path, monkeypatch, capsys
):
    """One slide, the run trained on slide tiles: the API's job (run by a real worker's child), the
    command line and the Predict page's Whole slide tab give the same verdict and probabilities."""
    import json

    from starlette.applications import Starlette
    from streamlit.testing.v1 import AppTest

    from core.api.routes import api_routes
    from core.jobs.worker import run_worker
    from tests.openapi_check import CheckedClient
    from tests.slides import two_region_slide

    settings, Session, _, _, _, run_id = trained
    slide_path, _, _ = two_region_slide(tmp_path / "biopsy.tif", "FL", "FL", width=1600, height=800, mpp=0.5)
    api = CheckedClient(Starlette(routes=api_routes(settings)), client=("127.0.0.1", 50000))  # AUTH_MODE=none
    queued = api.post(
        "/api/v1/slides",
        data={"run": str(run_id)},
        files={"slide": (slide_path.name, slide_path.read_bytes(), "image/tiff")},
    )
    assert queued.status_code == 202, queued.text
    run_worker(settings, once=True)
    job = api.get(f"/api/v1/slides/{queued.json()['id']}").json()
    assert job["status"] == "succeeded", job
    verdict = job["verdict"]
    assert verdict["predicted"] == "FL"  # both blocks are FL's texture

    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.setenv("INFERENCE_ENGINE", "torch")
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["predict-slide", "--run", str(run_id), "--out", str(tmp_path / "cli"), str(slide_path)]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "cli" / "biopsy.summary.json").read_text())
    assert cli["predicted"] == verdict["predicted"]
    assert cli["probabilities"] == pytest.approx(verdict["probabilities"], abs=1e-6)

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page("pages/predict.py").run()
    at.selectbox(key="sl_pick").set_value(job["id"]).run()
    assert not at.exception, at.exception
    (metric,) = [m for m in at.metric if m.label == "Slide verdict"]
    assert verdict["predicted"] in f"{metric.value} {metric.proto.delta}"  # e.g. "Uncertain, refer", "most likely FL"
    shown = " ".join(str(m.value) for m in at.markdown) + " ".join(str(c.value) for c in at.caption)
    top = verdict["probabilities"][verdict["predicted"]]
    assert f"{top:.1%}" in shown + " ".join(str(m.value) for m in at.metric), "the page shows the same probability"
