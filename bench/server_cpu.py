"""What the web server costs while someone watches a run train: one chromium session on the Runs
page (its live panel refreshing) while a tiny CPU run trains, and the server process's CPU use
over --duration seconds, as a share of one core.

It compares Streamlit's file watcher off (`server.fileWatcherType = "none"`, this project's
.streamlit/config.toml) with a baseline given by --baseline-watcher (default `auto`, Streamlit's own
default), each with a server of its own in the same run, one after the other on the same training
run. The watcher covers the project folder, .venv and ./var included.

    .venv/bin/python -m bench.server_cpu --duration 60
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.load_runs_page import (
    CHROMIUM,
    cpu_snapshot,
    machine,
    prepare_home,
    run_state,
    start_server,
    start_worker,
    stop,
    wait_for_runs,
)
from tests.server import free_port, wait_healthy

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def server_share(home: Path, training: int, watcher: str, duration: float, log: Path) -> float:
    """Mean share of one core that the server used while one browser watched the training run."""
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(home, port, log, [f"server.fileWatcherType={watcher}"])
    try:
        wait_healthy(url, server, 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url + "/runs")
            expect(page.get_by_text(f"Run {training}").first).to_be_visible(timeout=120_000)
            time.sleep(5)  # the first render's imports are not what an open page costs
            start, t0 = cpu_snapshot({"server": server.pid}), time.monotonic()
            time.sleep(duration)
            end, seconds = cpu_snapshot({"server": server.pid}), time.monotonic() - t0
            browser.close()
        used = sum(t - start["server"].get(pid, 0.0) for pid, t in end["server"].items())
        return used / seconds
    finally:
        stop(server)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60, help="seconds measured per server (default 60)")
    parser.add_argument("--baseline-watcher", default="auto", help="file watcher of the baseline server (default auto)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="server-cpu-"))
    home, worker = tmp / "home", None
    try:
        finished, training = prepare_home(home, 0, 100_000)
        worker = start_worker(home, 1, 1, tmp / "worker.log")
        wait_for_runs(home, finished, training, worker, 600)
        shares = {
            name: server_share(home, training, watcher, args.duration, tmp / f"server-{name}.log")
            for name, watcher in (("baseline", args.baseline_watcher), ("project", "none"))
        }
        if run_state(home, training)["status"] != "running":
            raise RuntimeError(f"the training run stopped: {run_state(home, training)}")
    finally:
        if worker is not None:
            stop(worker)
        shutil.rmtree(tmp, ignore_errors=True)
    m = machine()
    print(f"## Web server CPU, one browser on the Runs page while a run trains ({args.duration:.0f} s each)")
    print(f"machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}")
    print("| server | file watcher | share of one core |\n| --- | --- | --- |")
    print(f"| baseline | {args.baseline_watcher} | {shares['baseline']:.1%} |")
    print(f"| this project's config | none | {shares['project']:.1%} |")
    print(f"ratio baseline / project: {shares['baseline'] / max(shares['project'], 1e-9):.1f}x")
    return shares


if __name__ == "__main__":
    sys.exit(0 if main()["project"] < 0.10 else 1)
