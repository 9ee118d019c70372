"""Bounded memory for predictions: per request, per person and per process.

- A real server (`streamlit run serve.py`) given six 100-megapixel all-black PNGs (about 290 kB
  each) in one API request grows by less than two decoded images at its peak, and gives the memory
  back: the images are decoded one at a time, each reduced as it is decoded and dropped once cut.
- The same server counts uploads per person over all their browser sessions (MAX_USER_UPLOAD_MB),
  and lets go of the files of sessions that have ended.
- The model is found before any image is decoded; a request past MAX_PREDICT_PIXELS, a person past
  MAX_USER_PREDICT_PIXELS and a server past MAX_CONCURRENT_PREDICTIONS are refused with 413, 429 and
  503, nothing decoded.
- Ordinary images get exactly the probabilities the predictor gives the full images; only large ones
  are reduced (a tiled model gets them whole), and the Predict page keeps thumbnails only.

No training: each run is a row made by hand with a model file of an untrained DenseNet-201 (the
weights made once for the module), as in tests/test_predict_page.py; the torch engine throughout.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import time
import zlib
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from starlette.applications import Starlette
from starlette.testclient import TestClient

from core.access import accounts, tokens
from core.access.accounts import VIEWER, User
from core.api.routes import api_routes
from core.config import Settings, load_settings
from core.data import decoding
from core.errors import UserError
from core.inference import admission, engine, service
from core.store.db import RunStatus
from core.store.engine import make_sessionmaker
from core.training.model import PaperDenseNet
from core.training.run_config import RunConfig
from tests import runs as run_rows
from tests.server import free_port, start_app, stop_app, wait_healthy
from tests.synthetic import synthetic_image
from tests.test_upload_gate import PASSWORD, put_file, resident_mb, signed_in

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("CLL", "FL", "MCL")
MB = 1024 * 1024
BOMB_SIDE = 10_000  # 100 MP: MAX_IMAGE_PIXELS, the most one image may have; 300 MB of RGB, 400 MB decoded


def black_png(width: int, height: int) -> bytes:
    """An all-black 8-bit RGB PNG, compressed row by row (the pixels are never all in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(1 + 3 * width)  # each row: filter 0, then its pixels
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def encoded(image: PILImage.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return PaperDenseNet(len(CLASSES)).state_dict()


def add_run(settings: Settings, weights, preparation: dict | None = None, status=RunStatus.succeeded) -> int:
    """A run of dataset "lymphoma" (made when missing); a succeeded one gets a model file whose
    evaluation pipeline is `preparation` (default: whole images at 32 px, DenseNet-201's least)."""
    preparation = preparation or {"image_size": 32}
    config = RunConfig(
        dataset="lymphoma",
        image_size=preparation["image_size"],
        tiles=preparation.get("tiles", 0),
        epochs=1,
        weights="none",
        device="cpu",
    ).to_dict()
    weights = weights if status == RunStatus.succeeded else None
    return run_rows.add_run(
        settings,
        dataset="lymphoma",
        classes=CLASSES,
        config=config,
        status=status,
        weights=weights,
        meta={"preparation": preparation},
    )


@dataclasses.dataclass
class Home:
    settings: Settings
    run_id: int  # whole images at 32 px
    viewer: str  # the API token of "vera"

    def client(self, **changes) -> TestClient:
        """The API's routes alone, in this process, with settings `changes`."""
        app = Starlette(routes=api_routes(dataclasses.replace(self.settings, **changes)))
        return TestClient(app, client=("203.0.113.9", 40000))

    def predict(self, client: TestClient, files: list[tuple[str, bytes]], **params):
        """POST /predict of `files` as vera."""
        return client.post(
            "/api/v1/predict",
            params=params,
            headers={"Authorization": f"Bearer {self.viewer}"},
            files=[("images", (name, data, "image/png")) for name, data in files],
        )


@pytest.fixture(scope="module")
def home(tmp_path_factory, weights) -> Home:
    """One install for the module: ana's password account, vera's API token, a run with a model file
    and no approved model."""
    folder = tmp_path_factory.mktemp("memory") / "home"
    folder.mkdir()
    accounts.add_account(folder / "accounts.toml", "ana", PASSWORD, accounts.EDITOR)
    settings = load_settings({"APP_HOME": str(folder), "INFERENCE_ENGINE": "torch", "AUTH_MODE": "password"})
    run_id = add_run(settings, weights)
    _, viewer = tokens.add_token(settings.accounts_file, "vera", VIEWER)
    return Home(settings, run_id, viewer)


@pytest.fixture(scope="module")
def server(home):
    """The app on a real server over the module's install: 40 MB of uploads per session, 45 MB per
    person, and sessions that end one second after they disconnect."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS")}
    env.update(
        APP_HOME=str(home.settings.app_home),
        AUTH_MODE="password",
        START_WORKER="0",
        INFERENCE_ENGINE="torch",
        MAX_SESSION_UPLOAD_MB="40",
        MAX_USER_UPLOAD_MB="45",
        STREAMLIT_SERVER_DISCONNECTED_SESSION_TTL="1",
    )
    port, log_path = free_port(), home.settings.app_home / "streamlit.log"
    with open(log_path, "wb") as log:
        process = start_app(port, env, log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", process, log=log_path)
            yield f"http://127.0.0.1:{port}", process.pid
        finally:
            stop_app(process)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """100 MP of black in one PNG of under 300 kB."""
    data = black_png(BOMB_SIDE, BOMB_SIDE)
    assert len(data) < 300_000
    return data


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding any pixel fails the test (the header may be read)."""

    def decoded(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(decoding, "_load", decoded)
    monkeypatch.setattr(decoding, "_decode", decoded)


# ---------------------------------------------------------------------------------------------
# The server's memory


def test_six_100_megapixel_pngs_in_one_request_grow_the_server_by_less_than_two_decoded_images(home, server, bomb):
    url, pid = server

    def predict(files: list[tuple[str, bytes]]) -> httpx.Response:
        return httpx.post(
            f"{url}/api/v1/predict",
            params={"run": home.run_id},
            timeout=180,
            headers={"Authorization": f"Bearer {home.viewer}"},
            files=[("images", (name, data, "image/png")) for name, data in files],
        )

    assert predict([("small.png", encoded(synthetic_image("FL", 1, (160, 120))))]).status_code == 200  # model loaded
    before = resident_mb(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    response = predict([(f"black-{i}.png", bomb) for i in range(6)])
    peak, after = peak_mb(pid), resident_mb(pid)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [(a["image_name"], a["width"], a["height"]) for a in answers] == [
        (f"black-{i}.png", BOMB_SIDE, BOMB_SIDE) for i in range(6)
    ]
    # One decoded frame is 400 MB (PIL keeps RGB in 4 bytes a pixel); all six at once were 2.4 GB.
    assert peak - before < 600, f"the server's peak grew by {peak - before:.0f} MB"
    assert after - before < 150, f"the server kept {after - before:.0f} MB after answering"


# ---------------------------------------------------------------------------------------------
# Uploads per person


def test_one_persons_sessions_together_hold_at_most_max_user_upload_mb_until_they_end(server):
    """Three sessions of ana each try to upload two 19 MB files (114 MB in all). Each session may
    hold 40 MB, but ana together only 45 MB: the server keeps 38 MB of hers, its resident memory
    grows by about that, and it lets go of the files once her sessions end."""
    url, pid = server
    tabs = [signed_in(url) for _ in range(3)]  # ana, three times
    before = resident_mb(pid)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    statuses = [[put_file(url, tab.session_id, 19 * MB) for _ in range(2)] for tab in tabs]
    held, peak = resident_mb(pid) - before, peak_mb(pid) - before
    print(f"ana's three sessions: held {held:.0f} MB, peak {peak:.0f} MB")
    # The first session's two files fit; every later one would take ana past her 45 MB.
    assert statuses == [[204, 204], [413, 413], [413, 413]]
    # Kept: the 38 MB accepted (and what reading a request costs), not the 114 MB sent.
    assert held < 45 + 15, f"the server holds {held:.0f} MB more after ana's uploads"
    assert peak < 45 + 35, f"the server's peak grew by {peak:.0f} MB during ana's uploads"
    assert put_file(url, tabs[2].session_id, 2 * MB) == 204  # a small file still fits her last 5 MB
    tabs[0].close()
    tabs[1].close()
    # Closed sessions keep their files while they could be resumed; then the files are let go.
    deadline = time.monotonic() + 20
    while put_file(url, tabs[2].session_id, 19 * MB) != 204:
        assert time.monotonic() < deadline, "the uploads of closed sessions still count"
        time.sleep(0.5)
    # Ana now holds 21 MB in her last session; the 38 MB of the ended ones were given back (or reused).
    assert resident_mb(pid) - before < 45 + 15, f"the server holds {resident_mb(pid) - before:.0f} MB more"
    tabs[2].close()


# ---------------------------------------------------------------------------------------------
# The model first, then the budgets


def test_the_model_is_found_before_any_image_is_decoded(home, bomb, no_decoding):
    client = home.client()
    queued = add_run(home.settings, None, status=RunStatus.queued)
    for params, status, message in (
        ({}, 422, "No model is approved"),  # no run named, none approved
        ({"run": 999}, 404, "No run with id 999"),
        ({"run": queued}, 422, f"Run {queued} has no trained model"),
    ):
        response = home.predict(client, [("bomb.png", bomb)], **params)
        assert response.status_code == status and message in response.json()["error"], response.text
    Session = make_sessionmaker(home.settings.database_url)
    with pytest.raises(UserError, match="has no trained model"):
        service.classify(
            Session,
            home.settings,
            User("vera", VIEWER),
            [service.ImageInput("bomb.png", bomb)],
            run_id=queued,
            source="cli",
        )


def test_requests_past_their_budgets_are_refused_before_decoding(home, no_decoding):
    image = [("a.png", encoded(PILImage.new("RGB", (1200, 1000))))]  # 1.2 MP
    response = home.predict(home.client(max_predict_pixels=1_000_000), image, run=home.run_id)
    assert response.status_code == 413
    assert (
        "have 1.2 MP together" in response.json()["error"]
        and "(1.0 MP, MAX_PREDICT_PIXELS)" in response.json()["error"]
    )

    with admission.admitted(home.settings, "vera", 2_000_000):  # vera's own prediction under way, holding a turn
        busy = home.predict(home.client(max_user_predict_pixels=3_000_000), image, run=home.run_id)
        assert busy.status_code == 429 and "MAX_USER_PREDICT_PIXELS" in busy.json()["error"]
        full = home.predict(home.client(max_concurrent_predictions=1, predict_wait_seconds=0.2), image, run=home.run_id)
        assert full.status_code == 503 and "MAX_CONCURRENT_PREDICTIONS" in full.json()["error"]
        assert int(full.headers["retry-after"]) >= 1
    assert admission.under_way() == (0, {})  # every refusal gave back what it counted


# ---------------------------------------------------------------------------------------------
# What the model sees


def test_ordinary_images_get_the_same_probabilities_and_only_large_ones_are_reduced(home, weights):
    tiled = add_run(home.settings, weights, {"image_size": 32, "tiles": 2})
    grey16 = PILImage.fromarray((np.arange(300 * 200, dtype=np.uint16).reshape(200, 300) * 7) % 65535)
    ordinary = [
        ("rgb.png", encoded(synthetic_image("CLL", 3, (160, 120)))),
        ("grey16.png", encoded(grey16)),
        ("camera.jpg", encoded(synthetic_image("FL", 4, (1388, 1040)), "JPEG")),
        ("rgba.png", encoded(synthetic_image("MCL", 5, (200, 150)).convert("RGBA"))),
    ]
    images = [service.ImageInput(name, data) for name, data in ordinary + [("large.png", black_png(4500, 4000))]]
    Session = make_sessionmaker(home.settings.database_url)
    for run_id, reduced in ((home.run_id, (300, 267)), (tiled, (4500, 4000))):
        seen: list[tuple[int, tuple[int, int]]] = []
        results = service.classify(
            Session,
            home.settings,
            User("vera", VIEWER),
            images,
            run_id=run_id,
            source="cli",
            log=False,
            seen=lambda i, rgb: seen.append((i, rgb.size)),  # noqa: B023 (called within this round)
        )
        with Session() as s:
            predictor = engine.get_predictor(s, home.settings, run_id)
        full = [decoding.load_rgb(io.BytesIO(im.data)) for im in images]
        expected = predictor.predict(full).shown
        for result, probs in zip(results[:4], expected):
            assert [result.probabilities[c] for c in CLASSES] == list(probs)  # exactly, not nearly
        assert [(r.width, r.height) for r in results] == [im.size for im in full]
        assert seen == [(i, im.size) for i, im in enumerate(full[:4])] + [(4, reduced)]
        # 4500x4000 has 18 MP, past REDUCE_ABOVE_PIXELS: tiles need it whole; resized whole to
        # 32 px, it is averaged 15 x 15 on decoding (its shorter side stays at least 8 x 32 px).
        assert [results[4].probabilities[c] for c in CLASSES] == pytest.approx(list(expected[4]), abs=1e-6)


def test_large_images_are_reduced_as_they_are_decoded_and_small_ones_left_whole():
    ramp = np.arange(4500, dtype=np.uint16) * 14  # 18 MP of 16-bit grey, dark to light
    big_grey16 = encoded(PILImage.fromarray(np.broadcast_to(ramp, (4000, 4500)).copy()), compress_level=1)
    big_jpeg = encoded(PILImage.new("RGB", (4500, 4000), (90, 60, 200)), "JPEG")
    small = encoded(synthetic_image("CLL", 8, (1388, 1040)), compress_level=1)

    def load(data: bytes, reduce_to: int | None) -> PILImage.Image:
        return decoding.load_rgb(io.BytesIO(data), 100_000_000, reduce_to=reduce_to)

    # PNG: decoded whole, then 15 x 15 blocks averaged as it is converted, a stripe at a time.
    reduced = load(big_grey16, 256)
    assert reduced.size == (300, 267)
    assert np.array_equal(np.asarray(reduced), np.asarray(load(big_grey16, None).reduce(15)))
    # JPEG: its decoder decodes 1/8 of each side (then 18 MP / 64 is small enough to keep).
    assert load(big_jpeg, 256).size == (563, 500) and load(big_jpeg, None).size == (4500, 4000)
    assert load(big_jpeg, 600).size == (1125, 1000)  # 1/4: the shorter side stays at least 600
    assert np.array_equal(np.asarray(load(small, 256)), np.asarray(load(small, None)))  # 1.4 MP: whole


def test_the_predict_page_keeps_a_thumbnail_of_each_image_not_the_image(home, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("APP_HOME", str(home.settings.app_home))
    monkeypatch.setenv("INFERENCE_ENGINE", "torch")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180).run()
    at.switch_page("pages/predict.py").run()
    at.selectbox(key="pr_run").set_value(home.run_id).run()
    at.file_uploader(key="pr_files").set_value(
        [
            ("large.png", black_png(4500, 4000), "image/png"),
            ("small.png", encoded(synthetic_image("FL", 6, (160, 120))), "image/png"),
        ]
    ).run()
    assert not at.exception, at.exception
    (result,) = at.session_state["pr_results"].values()
    assert [a.name for a in result["answers"]] == ["large.png", "small.png"]
    kept = [item for value in result.values() if isinstance(value, list) for item in value]
    assert not [item for item in kept if isinstance(item, (PILImage.Image, np.ndarray))]
    sizes = [PILImage.open(io.BytesIO(t)).size for t in result["thumbnails"]]
    assert sizes == [(300, 267), (160, 120)] and all(len(t) < 100_000 for t in result["thumbnails"])
    assert [i.caption for i in at.get("image")[0].proto.imgs] == ["4500×4000 px"]  # the image's own size
    assert [c for c in at.caption if c.value.startswith("Grad-CAM for")]  # the heat map, from the upload
