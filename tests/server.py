"""A real server for the tests that need one: `streamlit run serve.py` on a free port, the wait until
it serves, and a client that speaks Streamlit's websocket protocol."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 90, log: object = None) -> None:
    """Return once Streamlit's health endpoint answers; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {process.returncode}" + (f"; see {log}" if log else ""))
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("streamlit did not become healthy")


def start_app(port: int, env: dict[str, str], log: object, options: Sequence[str] = ()) -> subprocess.Popen:
    """The app as `make run` serves it (serve.py's gate in front), on 127.0.0.1:`port`, in its own
    process group; returns before it is up (wait_healthy). `options`: more KEY=VALUE settings of
    Streamlit's (bench/load_runs_page.py passes them on)."""
    extra = [part for option in options for part in ("--" + option.split("=", 1)[0], option.split("=", 1)[1])]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "serve.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--server.fileWatcherType",
            "none",
            "--browser.gatherUsageStats",
            "false",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_app(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def settle(page) -> None:
    """Wait in a Playwright `page` until Streamlit has finished the rerun an input caused: its
    running indicator gone and no widget still loading (a rerun starts a moment after the input)."""
    from playwright.sync_api import expect

    page.wait_for_timeout(400)
    page.wait_for_load_state("networkidle")
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)
    expect(page.get_by_test_id("stSkeleton")).to_have_count(0)


class ProtocolClient:
    """One browser session speaking Streamlit's websocket protocol, as the browser does: a
    `rerun_script` message with the widgets' states for each script run, answered by the run's
    elements. `session_id` is the one the server gave the session."""

    def __init__(self, url: str, cookie: str | None = None) -> None:
        from websockets.sync.client import connect

        headers = {"Cookie": cookie} if cookie else None
        self.ws = connect(
            "ws" + url.removeprefix("http") + "/_stcore/stream",
            subprotocols=["streamlit"],
            max_size=None,
            open_timeout=30,
            additional_headers=headers,
        )
        self.session_id = ""

    def send(self, msg: object) -> None:
        self.ws.send(msg.SerializeToString())

    def rerun(self, *widgets: object, timeout: float = 90) -> list:
        """Run the script with these WidgetStates; the elements of the run that finished it."""
        from streamlit.proto.BackMsg_pb2 import BackMsg

        msg = BackMsg()
        msg.rerun_script.widget_states.widgets.extend(widgets)
        self.send(msg)
        return self.until_finished(timeout)

    def until_finished(self, timeout: float) -> list:
        """Elements of the script run, until one finishes successfully (a run that calls
        st.rerun finishes early, and the next one draws the page)."""
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        done = ForwardMsg.FINISHED_SUCCESSFULLY
        elements: list = []
        deadline = time.monotonic() + timeout
        while True:
            msg = ForwardMsg()
            msg.ParseFromString(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            kind = msg.WhichOneof("type")
            if kind == "new_session":
                self.session_id = msg.new_session.initialize.session_id or self.session_id
                elements = []
            elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
                elements.append(msg.delta.new_element)
            elif kind == "script_finished" and msg.script_finished == done:
                return elements

    def close(self) -> None:
        self.ws.close()
