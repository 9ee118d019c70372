"""Whole slides classified in the background (core/jobs/slide_jobs.py), asked for through the API:
checked before anything is queued, claimed by a real worker that runs `python -m core _slide` in its
own process, followed tile by tile, and answered with the verdict, the GeoJSON for QuPath and the
per-tile CSV; an uploaded slide is let go once its job has ended, and a viewer sees only their own.

No training: the run's model file holds an untrained DenseNet-201 at 32 px that records the scale of
its tiles (32 px at 1 micron per pixel), as a run on a slide dataset leaves one (made as
tests/test_slide_predict.py makes its runs). The torch engine.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.access import accounts, tokens
from core.access.accounts import VIEWER, User
from core.api.routes import api_routes
from core.config import Settings, load_settings
from core.errors import UserError
from core.jobs import slide_jobs, views
from core.jobs.worker import run_worker
from core.slides.scale import ModelScale
from core.store.db import PredictionLog, RunStatus, SlideJob
from core.store.engine import make_sessionmaker
from core.training.model import PaperDenseNet
from tests.openapi_check import CheckedClient
from tests.slides import two_region_slide
from tests.test_slide_predict import add_run

CLASSES = ("CLL", "FL")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide-jobs")
    app_home = folder / "home"
    app_home.mkdir()
    accounts.add_account(app_home / "accounts.toml", "ana", "correct horse battery", accounts.EDITOR)
    settings = load_settings(
        {
            "APP_HOME": str(app_home),
            "INFERENCE_ENGINE": "torch",
            "AUTH_MODE": "password",
            "HEARTBEAT_SECONDS": "0.5",
            "START_WORKER": "0",
        }
    )
    torch.manual_seed(0)
    state = PaperDenseNet(len(CLASSES)).state_dict()
    runs = {
        "scaled": add_run(settings, state, CLASSES, ModelScale(32, 1.0)),
        "fields": add_run(settings, state, CLASSES, None),
    }
    _, vera = tokens.add_token(settings.accounts_file, "vera", VIEWER)
    _, otto = tokens.add_token(settings.accounts_file, "otto", VIEWER)
    slide, _, _ = two_region_slide(folder / "biopsy.tif", width=1600, height=800, mpp=0.5)
    return settings, runs, {"vera": vera, "otto": otto}, Path(slide)


def client(settings: Settings) -> TestClient:
    # Each answer is held to the API's OpenAPI document as it comes (tests/openapi_check.py).
    return CheckedClient(Starlette(routes=api_routes(settings)), client=("203.0.113.9", 40000))


def post_slide(c: TestClient, token: str, slide: Path, **fields):
    return c.post(
        "/api/v1/slides",
        headers={"Authorization": f"Bearer {token}"},
        data=fields,
        files={"slide": (slide.name, slide.read_bytes(), "image/tiff")},
    )


@pytest.fixture(scope="module")
def classified(home) -> int:
    """The id of a job the API queued for vera and the worker classified (each test that needs one
    gets it, in any order)."""
    settings, runs, token, slide = home
    queued = post_slide(client(settings), token["vera"], slide, run=str(runs["scaled"]))
    assert queued.status_code == 202, queued.text
    run_worker(settings, once=True)
    return queued.json()["id"]


def test_a_slide_sent_to_the_api_is_checked_first_and_a_queued_one_can_be_cancelled(home):
    settings, runs, token, slide = home
    c, vera = client(settings), {"Authorization": f"Bearer {token['vera']}"}
    # What can be checked is checked before anything is queued, and nothing is kept of a refusal.
    refused = post_slide(c, token["vera"], slide, run=str(runs["fields"]))
    assert refused.status_code == 422 and "field images of unknown scale" in refused.json()["error"]
    not_a_slide = c.post(
        "/api/v1/slides",
        headers=vera,
        data={"run": str(runs["scaled"])},
        files={"slide": ("notes.tif", b"not a slide at all", "image/tiff")},
    )
    assert not_a_slide.status_code == 422, not_a_slide.text
    assert not list(settings.slide_uploads_dir.glob("*"))

    queued = post_slide(c, token["vera"], slide, run=str(runs["scaled"]))
    assert queued.status_code == 202, queued.text
    job = queued.json()
    assert job["status"] == "queued" and queued.headers["location"] == job["url"] == f"/api/v1/slides/{job['id']}"
    assert job["tiles_total"] is None and job["verdict"] is None
    assert c.get(job["url"], headers={"Authorization": f"Bearer {token['otto']}"}).status_code == 404  # not otto's
    assert c.get(f"{job['url']}/geojson", headers=vera).status_code == 409  # not done
    Session = make_sessionmaker(settings.database_url)
    with Session() as s:
        stored = Path(s.get(SlideJob, job["id"]).slide_path)
    assert stored.is_file()
    with pytest.raises(UserError, match="of yours"):  # otto's is not vera's to cancel
        slide_jobs.cancel_slide(Session, settings, job["id"], User("otto", VIEWER))
    assert slide_jobs.cancel_slide(Session, settings, job["id"], User("vera", VIEWER)) == RunStatus.cancelled
    assert not stored.exists()  # the upload is let go once its job has ended
    assert c.get(job["url"], headers=vera).json()["status"] == "cancelled"


def test_the_worker_classifies_a_queued_slide_and_the_api_answers_with_its_files(home, classified):
    settings, runs, token, slide = home
    c, vera = client(settings), {"Authorization": f"Bearer {token['vera']}"}
    done = c.get(f"/api/v1/slides/{classified}", headers=vera).json()
    assert done["status"] == "succeeded", done
    verdict = done["verdict"]
    assert done["tiles_done"] == done["tiles_total"] == verdict["tiles_kept"] > 20
    assert verdict["predicted"] in CLASSES and sum(verdict["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert (verdict["tile_px"], verdict["tile_mpp"], verdict["slide_mpp"]) == (32, 1.0, 0.5)
    geojson = c.get(done["geojson_url"], headers=vera)
    features = json.loads(geojson.content)["features"]
    assert len(features) == verdict["tiles_kept"]
    assert all(len(f["geometry"]["coordinates"][0]) == 5 for f in features)
    rows = list(csv.DictReader(io.StringIO(c.get(done["tiles_csv_url"], headers=vera).text)))
    assert len(rows) == verdict["tiles_kept"]
    # The upload is let go; what the page shows stays with the job; the slide is logged like an image.
    with make_sessionmaker(settings.database_url)() as s:
        assert not Path(s.get(SlideJob, classified).slide_path).exists()
        logged = s.scalars(select(PredictionLog).where(PredictionLog.image_name == slide.name)).all()
        view = views.slide_job(s, settings, classified)
    folder = settings.slide_jobs_dir / str(classified)
    assert {"summary.json", "heatmap.npz", "thumbnail.jpg"} <= {p.name for p in folder.iterdir()}
    assert [(r.user, r.source, r.run_id, r.predicted) for r in logged if r.source == "api"] == [
        ("vera", "api", runs["scaled"], verdict["predicted"])
    ]
    heat = views.load_heat_map(view, CLASSES)
    assert int((heat.predicted == heat.predicted).sum()) == verdict["tiles_kept"]  # one cell per tile, NaN elsewhere
    layer = views.overlay(view, CLASSES)
    assert layer.shape == (heat.thumbnail_height, heat.thumbnail_width, 4)
    assert 0 < (layer[..., 3] > 0).mean() < 0.9  # tissue coloured, glass clear


def test_the_page_the_command_line_and_the_api_give_one_verdict_for_one_slide(
    home, classified, tmp_path, monkeypatch, capsys
):
    """The job the API had classified, shown on the Predict page's Whole slide tab, and the same slide
    through `python -m core predict-slide`: the same verdict and probabilities. A slide sent from the
    page is queued under the page's user."""
    from streamlit.testing.v1 import AppTest

    from core.__main__ import main

    settings, runs, _, slide = home
    Session = make_sessionmaker(settings.database_url)
    with Session() as s:
        done = views.slide_job(s, settings, classified)
    api = done.verdict
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.setenv("INFERENCE_ENGINE", "torch")
    monkeypatch.setenv("AUTH_MODE", "none")
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.delenv("DATABASE_URL", raising=False)

    assert main(["predict-slide", "--run", str(runs["scaled"]), "--out", str(tmp_path), str(slide)]) == 0
    capsys.readouterr()
    cli = json.loads((tmp_path / "biopsy.summary.json").read_text())
    assert cli["predicted"] == api.predicted
    assert cli["probabilities"] == pytest.approx(api.probabilities, abs=1e-6)

    app = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
    # The tab's module is imported once per process, here first under another install: nothing of
    # that install (its settings, its user) may stay with it.
    monkeypatch.setenv("APP_HOME", str(tmp_path / "other"))
    other = AppTest.from_file(app, default_timeout=120).run()
    other.switch_page("pages/predict.py").run()
    assert not other.exception, other.exception[0].stack_trace if other.exception else ""
    with pytest.raises(KeyError):  # no run there can classify a slide
        other.selectbox(key="sl_run")
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    at = AppTest.from_file(app, default_timeout=120).run()
    at.switch_page("pages/predict.py").run()
    assert not at.exception, at.exception[0].stack_trace if at.exception else ""
    assert (
        at.selectbox(key="sl_run").options == [str(runs["scaled"])]
        or at.selectbox(key="sl_run").value == runs["scaled"]
    )  # only the run that records a scale
    at.selectbox(key="sl_pick").set_value(done.id).run()
    assert not at.exception, at.exception
    (metric,) = [m for m in at.metric if m.label == "Slide verdict"]
    assert api.predicted in (metric.value, metric.proto.delta)
    heat = [c for c in at.get("plotly_chart") if "by predicted class" in c.proto.spec]
    labels = [b.proto.label for b in at.get("download_button")]
    assert heat and {"GeoJSON for QuPath", "Tiles (.csv)"} <= set(labels)

    at.file_uploader(key="sl_file").set_value([(slide.name, slide.read_bytes(), "image/tiff")])
    at.button(key="FormSubmitter:sl_form-Classify slide").click().run()
    assert not at.exception, at.exception
    with Session() as s:
        newest = views.slide_jobs(s, settings)[0]
    assert (newest.slide_name, newest.user, newest.status) == (slide.name, "local", RunStatus.queued)
    assert at.session_state["sl_job"] == newest.id
    slide_jobs.cancel_slide(Session, settings, newest.id, User("local", "editor"))
