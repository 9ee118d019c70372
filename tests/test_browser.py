"""End to end in a real browser: `streamlit run` on a free port with its own APP_HOME, Debian's
chromium driven by Playwright. Upload a zip, launch a tiny CPU run, watch the worker (started by the
app) finish it, classify an image. Screenshots of every page go to test-artifacts/browser/.

`make test` installs chromium (scripts/system-packages.sh) when it is missing.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from core.config import load_settings
from core.store.db import Run, RunStatus, make_sessionmaker
from tests.conftest import stop_workers
from tests.server import free_port, wait_healthy
from tests.synthetic import synthetic_image, write_dataset

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
def app(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS")}
    env.update(APP_HOME=str(home), DEFAULT_WEIGHTS="none", HEARTBEAT_SECONDS="1", PYTHONUNBUFFERED="1")
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS / "streamlit.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "serve.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, load_settings({"APP_HOME": str(home)})
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
        stop_workers(load_settings({"APP_HOME": str(home)}).database_url)


def test_upload_train_watch_and_predict_in_a_browser(app, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    url, cfg = app
    expect.set_options(timeout=60_000)  # the first page load imports torch
    write_dataset(tmp_path / "lymphoma", per_class=8)
    zip_path = tmp_path / "lymphoma.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted((tmp_path / "lymphoma").rglob("*.tif")):
            zf.write(path, path.relative_to(tmp_path).as_posix())
    new_image = tmp_path / "new-FL.tif"
    synthetic_image("FL", 500, (320, 240)).save(new_image)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)

        def shot(name: str) -> None:
            # Streamlit scrolls inside its main container, so a full-page screenshot would stop at the
            # viewport: grow the viewport to the content's height for the picture, then restore it.
            height = page.evaluate("document.querySelector('[data-testid=stMainBlockContainer]').scrollHeight")
            page.set_viewport_size({"width": 1440, "height": max(1000, int(height) + 120)})
            page.wait_for_timeout(800)  # let charts redraw at the new size
            page.screenshot(path=str(SHOTS / f"{name}.png"))
            page.set_viewport_size({"width": 1440, "height": 1000})

        def settle() -> None:  # Streamlit shows a running indicator while the script reruns
            page.wait_for_timeout(400)  # a rerun starts a moment after the input that caused it
            page.wait_for_load_state("networkidle")
            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)
            expect(page.get_by_test_id("stSkeleton")).to_have_count(0)  # widgets still loading

        # Home on an empty install; the app starts the worker by itself.
        page.goto(url)
        expect(page.get_by_role("heading", name="Lymphoma subtype recognition")).to_be_visible()
        expect(page.get_by_test_id("stSidebarNav")).to_be_visible()
        expect(page.get_by_test_id("stSidebar").get_by_text("Background worker")).to_be_visible()
        settle()
        shot("1-home-empty")

        # Datasets: upload the zip.
        page.goto(url + "/dataset")
        uploader = page.get_by_test_id("stFileUploader").first
        uploader.locator("input[type=file]").set_input_files(str(zip_path))
        expect(page.get_by_text("lymphoma.zip")).to_be_visible()
        page.get_by_role("button", name="Add images").click()
        expect(page.get_by_text("24 image(s) added")).to_be_visible(timeout=90_000)
        expect(page.get_by_text("Images per class in 'lymphoma'").first).to_be_visible()
        settle()
        shot("2-dataset")

        # Augmentation: the live preview of one image.
        page.goto(url + "/augmentation")
        expect(page.get_by_text("no operation fired").or_(page.get_by_text("rotate")).first).to_be_visible()
        settle()
        shot("3-augmentation")

        # Train: a tiny CPU run (weights "none" is this site's default), launched in the background.
        page.goto(url + "/train")
        expect(page.get_by_text("Backbone weights")).to_be_visible()
        for label, value in (("Image size (px)", "32"), ("Epochs", "1"), ("Augmented images per class", "8"),
                             ("Batch size", "24")):
            box = page.get_by_label(label, exact=True)
            box.fill(value)
            box.press("Enter")
            settle()
        expect(page.get_by_label("None: random initialisation")).to_be_checked()
        shot("4-train")
        page.get_by_role("button", name="Launch training").click()
        expect(page.get_by_text("Queued run 1")).to_be_visible()
        Session = make_sessionmaker(cfg.database_url)
        with Session() as s:
            run = s.scalars(select(Run)).one()
            assert (run.config["image_size"], run.config["epochs"], run.config["per_class"]) == (32, 1, 8)

        # Runs: the worker trains it; the page follows it live until it succeeds.
        page.goto(url + "/runs")
        progress = page.get_by_test_id("stProgress")
        try:  # a picture of the live view, if the run is still going when the page opens
            progress.wait_for(state="visible", timeout=20_000)
            shot("5a-runs-live")
        except PlaywrightTimeout:
            pass
        expect(page.get_by_role("heading", name=re.compile(r"Run 1 .*succeeded"))).to_be_visible(timeout=150_000)
        expect(page.get_by_text("Per-class results (the paper's Table I layout)")).to_be_visible()
        with Session() as s:
            assert s.get(Run, run.id).status == RunStatus.succeeded
        settle()
        shot("5-runs")

        # Predict: classify a new TIF image.
        page.goto(url + "/predict")
        page.get_by_test_id("stFileUploader").locator("input[type=file]").set_input_files(str(new_image))
        # A subtype, or (for a model this small, whose calibrated confidence is low) the refer verdict.
        expect(page.get_by_text(re.compile("Predicted subtype|Uncertain, refer")).first).to_be_visible(timeout=90_000)
        expect(page.get_by_text("Grad-CAM for").first).to_be_visible(timeout=90_000)
        settle()
        shot("6-predict")

        page.goto(url)
        settle()
        shot("7-home-with-data")
        browser.close()
