from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from core.config import Settings, load_settings
from core.store.db import Worker
from core.store.engine import make_sessionmaker

torch.set_num_threads(2)


def stop_workers(database_url: str) -> None:
    """Stop background workers recorded in a database (they run detached, in their own session)."""
    Session = make_sessionmaker(database_url)
    with Session() as s:
        pids = [w.pid for w in s.scalars(select(Worker))]
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmdline:  # the pid is still our worker, not a reused one
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)


@pytest.fixture(autouse=True, scope="session")
def default_app_home(tmp_path_factory):
    """Code that reads settings from the environment without a test's own APP_HOME (e.g. a page
    rerun after its test ended) writes to a temporary folder, never to the checkout's ./var;
    any worker started there is stopped at the end."""
    home = tmp_path_factory.mktemp("default-app-home")
    previous = os.environ.get("APP_HOME")
    os.environ["APP_HOME"] = str(home)
    yield home
    if (home / "app.db").exists():
        stop_workers(load_settings({"APP_HOME": str(home)}).database_url)
    if previous is None:
        os.environ.pop("APP_HOME", None)
    else:
        os.environ["APP_HOME"] = previous


@pytest.fixture(autouse=True)
def fresh_weights_check():
    """Which backbone weights load is remembered per process (core/training/presets.py); a test that
    changes TORCH_HOME or the weights must not see an earlier test's answer."""
    from core.training.presets import usable_weights

    usable_weights.cache_clear()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"APP_HOME": str(tmp_path / "home")})


@pytest.fixture
def Session(settings: Settings):
    return make_sessionmaker(settings.database_url)


@pytest.fixture(scope="session")
def postgres_server():
    """URL of a PostgreSQL server for the tests: TEST_POSTGRES_URL, or a throwaway one started from
    the installed binaries for this session. Without either the test fails, saying what to install."""
    from tests import pg

    url = os.environ.get("TEST_POSTGRES_URL")
    if url:
        pg.wait_until_ready(url)
        yield url
        return
    bin_dir = pg.find_bin_dir()
    if bin_dir is None:
        pytest.fail(pg.INSTALL_HINT, pytrace=False)
    cluster = pg.Cluster(bin_dir)
    try:
        url = cluster.start()
        pg.wait_until_ready(url)
        yield url
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from tests import pg

    url = pg.create_database(postgres_server)
    yield url
    pg.drop_database(postgres_server, url)
