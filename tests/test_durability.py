"""Crash safety of stored files.

The atomic writer (core/store/files.py) never leaves a half-written file under a target's name. End to
end: a real `streamlit run` server is killed with SIGKILL while it ingests an upload (driven in
Debian's chromium through Playwright, as in tests/test_browser.py); afterwards the dataset that was
there before is intact, every file under images/ is whole, the consistency check finds only
leftovers, `python -m core check --fix` clears them, and after a restart the same upload succeeds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from core.access.accounts import LOCAL_USER
from core.config import load_settings
from core.data.decoding import load_rgb
from core.data.ingest import ingest
from core.store import consistency
from core.store.db import Dataset, Image
from core.store.engine import make_sessionmaker
from core.store.files import atomic_path, is_temp_name, write_bytes_atomic
from tests.server import free_port, settle, start_app, wait_healthy
from tests.synthetic import write_dataset

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"  # installed by `make test` (scripts/system-packages.sh)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# ---------------------------------------------------------------------------------------------
# The atomic writer


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "model.pt"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the ne")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]

    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and is_temp_name(tmp.name)  # same folder: rename is atomic
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # replaced only when the block ends
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_temp_names_are_recognised():
    assert is_temp_name(".tmp-abc123") and is_temp_name("tmpk2j3h4g5.tmp")  # the latter: older versions
    assert not is_temp_name("best.pt") and not is_temp_name("ab" * 32 + ".tif") and not is_temp_name("tmp.png")


# ---------------------------------------------------------------------------------------------
# kill -9 during an upload


def launch_server(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`streamlit run` on a free port, in its own process group; returns before it is up."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS", "AUTH_MODE")}
    env.update(APP_HOME=str(home), START_WORKER="0", PYTHONUNBUFFERED="1")
    process = start_app(port, env, open(log, "ab"))
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_files(images: Path) -> list[Path]:
    return sorted(p for p in images.rglob("*") if p.is_file()) if images.exists() else []


def test_kill_9_during_an_upload_loses_nothing_and_the_upload_can_be_retried(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "home"
    cfg = load_settings({"APP_HOME": str(home)})
    Session = make_sessionmaker(cfg.database_url)
    write_dataset(tmp_path / "first", per_class=4)
    with Session.begin() as s:
        ingest(s, cfg, tmp_path / "first", "first", user=LOCAL_USER)
    with Session() as s:
        before = sorted((im.sha256, im.stored_path, im.label, im.original_name) for im in s.scalars(select(Image)))
    first_paths = {home / path for _, path, _, _ in before}

    # Big enough that storing it takes seconds (each file is fsynced), so the kill lands mid-ingest.
    per_class = 50
    write_dataset(tmp_path / "src" / "second", per_class=per_class, size=(64, 64))
    upload = tmp_path / "second.zip"
    with zipfile.ZipFile(upload, "w") as zf:
        for path in sorted((tmp_path / "src").rglob("*.tif")):
            zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    log = tmp_path / "streamlit.log"

    process, url = launch_server(home, log)
    try:
        wait_healthy(url, process, 60, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)

            def upload_zip() -> None:
                page.goto(url + "/dataset")
                settle(page)
                page.get_by_role("tab", name="Add images").click()
                # The tab's content is drawn by the rerun its click starts; a file given to an
                # uploader of that rerun's half-drawn page can be dropped with it.
                settle(page)
                expect(page.get_by_text("A .zip with one folder per class")).to_be_visible()
                # Until its upload request is answered, the file is not the widget's value yet.
                with page.expect_response(lambda r: "/_stcore/upload_file" in r.url and r.request.method == "PUT"):
                    page.get_by_test_id("stFileUploader").first.locator("input[type=file]").set_input_files(str(upload))
                expect(page.get_by_text("second.zip")).to_be_visible()
                page.get_by_role("button", name="Add images").click()

            upload_zip()
            # Kill as soon as the second dataset's first files are stored, long before its commit.
            deadline = time.monotonic() + 60
            while True:
                new = [f for f in stored_files(cfg.images_dir) if f not in first_paths and not is_temp_name(f.name)]
                if len(new) >= 3:
                    break
                assert time.monotonic() < deadline, f"the ingest never started storing; see {log}"
                time.sleep(0.01)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            # Restarted at once (the files are looked at while it starts; it touches none until a
            # page is opened).
            process, url = launch_server(home, log)

            # The dataset that was there is untouched; the killed one never happened.
            with Session() as s:
                assert s.scalars(select(Dataset.name)).all() == ["first"]
                after = sorted(
                    (im.sha256, im.stored_path, im.label, im.original_name) for im in s.scalars(select(Image))
                )
            assert after == before
            for sha, path, _, _ in before:
                assert sha256(home / path) == sha
            # Under images/ every file is whole (its name is its content's hash) and decodes, or is a
            # temporary file of the interrupted write; none is half-written under a stored name.
            leftovers = stored_files(cfg.images_dir)
            temps = [f for f in leftovers if is_temp_name(f.name)]
            for f in leftovers:
                if f not in temps:
                    assert sha256(f) == f.stem, f"{f} is not whole"
                    load_rgb(f)
            orphans = [f for f in leftovers if f not in first_paths and f not in temps]
            assert len(orphans) >= 3
            assert not [f for f in home.rglob("*") if is_temp_name(f.name) and not f.is_relative_to(cfg.images_dir)]

            report = consistency.check(Session, cfg, deep=True)
            assert {p.kind for p in report.problems} <= {"orphan", "temp"}, report.format()
            assert len(report.of_kind("orphan")) == len(orphans)
            assert any(p.path.startswith("tmp/") for p in report.of_kind("temp"))  # the upload's work folder

            # A restarted server warns on its Home page, an administrator clears the leftovers, and
            # the user uploads again.
            wait_healthy(url, process, 60, log)
            page.goto(url)
            expect(page.get_by_text("disagree")).to_be_visible()
            expect(page.get_by_text("unreferenced file(s) under images/")).to_be_visible()
            env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
            fix = subprocess.run(
                [sys.executable, "-m", "core", "check", "--fix"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**env, "APP_HOME": str(home)},
                timeout=60,
            )
            assert fix.returncode == 0, fix.stdout + fix.stderr
            assert fix.stdout.count("removed: ") == len(report.problems)
            assert consistency.check(Session, cfg).clean
            upload_zip()
            expect(page.get_by_text(f"{3 * per_class} image(s) added")).to_be_visible()
            browser.close()
    finally:
        stop(process)

    with Session() as s:
        assert sorted(s.scalars(select(Dataset.name))) == ["first", "second"]
        assert len(s.scalar(select(Dataset).where(Dataset.name == "second")).images) == 3 * per_class
        assert (
            sorted(
                (im.sha256, im.stored_path, im.label, im.original_name)
                for im in s.scalars(select(Image).join(Dataset).where(Dataset.name == "first"))
            )
            == before
        )
    assert consistency.check(Session, cfg, deep=True).clean
