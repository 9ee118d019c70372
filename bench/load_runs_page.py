"""Load test of the Runs page: N concurrent sessions against the real web app while a run trains.

Its protocol sessions speak Streamlit 1.67's private websocket protocol (BackMsg/ForwardMsg), which
a Streamlit upgrade may change: it is run by hand, not in the test suite (bench/RESULTS.md).

It builds a throw-away APP_HOME (a synthetic dataset, finished runs and one run that keeps training,
all at tiny CPU settings), starts its own `python -m core worker` and `streamlit run serve.py`
(headless, a free port, START_WORKER=0, AUTH_MODE=none), and opens the sessions:

- --browsers of them (default 2) in one Debian chromium, one browser context (own cookies and
  cache: one user) each. Their render time ends when the page is drawn: nothing left stale from
  the previous script run, no loading skeleton, the chosen run's heading and its content on screen.
- the others speak Streamlit's websocket protocol as the browser does (see ProtocolSession),
  including the live panel's refresh every 2 s. The server does all its work for them, but
  nothing is drawn: their render time ends when the server has sent the whole page. Twenty
  chromium pages on 2 cores spend the cores on drawing (measured: chromium 1.2 cores, the server
  0.16) and time the client, not the app; --browsers 20 does it anyway.

While the worker trains the fixture's runs, each session loads /runs for the first time (a
browser into an empty cache; the server's first runs of the page import its libraries); these first
loads are reported apart. Then the timed phase: until --duration has passed (visits under way then
are finished), each session

  1. loads /runs: the newest run, the one training, shows (progress, metrics, live curves);
  2. picks a finished run in the "Run" select box: confusion matrix and the paper's Table I;
  3. pauses about --think seconds.

Errors are uncaught page exceptions, console errors, failed HTTP requests, Streamlit exception
boxes and error alerts, renders that do not finish within --render-timeout, tracebacks in the
server's log, and a training run that is no longer running.

    .venv/bin/python -m bench.load_runs_page --sessions 20 --duration 60
    .venv/bin/python -m bench.load_runs_page --sessions 3 --duration 10 --finished-runs 1 --out /tmp/load.json

Prints a table (sessions, renders, errors, p50/p95/max render time per kind of client and view,
the machine and its load, the CPU used by the server, the training and the clients, the training
run's progress during the timed phase) and writes it as JSON to --out, with every render and
error. Exits 1 when there was any error, no render, or no training progress during the timed phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.access.accounts import LOCAL_USER
from tests.server import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# The flags tests/test_browser.py launches chromium with.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 900}
TABLE_ONE = "Per-class results (the paper's Table I layout)"

# True once the page shows run `id` completely: Streamlit idle (no element still marked stale from
# the previous run of the script, no loading skeleton), the run's heading, and the content of its
# view. A succeeded run shows Table I and the confusion matrix; a training run its progress bar,
# metrics, and curves once an epoch is recorded. Streamlit marks elements data-stale while a rerun
# is under way (its running indicator shows only runs longer than 0.5 s). A training run's panel
# is a fragment that reruns every 2 s by itself, so its own elements may be stale at any moment
# after the page has rendered: staleness inside it (the block holding the progress bar), and the
# running indicator, which cannot tell its reruns from the page's, are not waited for there.
RENDERED_JS = f"""([id, view]) => {{
  const all = s => Array.from(document.querySelectorAll(s));
  const progress = document.querySelector('[data-testid=stProgress]');
  const live = view === 'live' && progress ? progress.closest('[data-testid=stVerticalBlock]') : null;
  if (all('[data-stale=true]').some(e => !(live && live.contains(e)))) return false;
  if (all('[data-testid=stSkeleton]').length) return false;
  if (view === 'results' && all('[data-testid=stStatusWidget]').length) return false;
  const heading = new RegExp('^\\\\s*Run ' + id + '\\\\b');
  if (!all('h3').some(h => heading.test(h.textContent))) return false;
  const text = document.body.innerText;
  const plots = all('[data-testid=stPlotlyChart] .main-svg').length;
  if (view === 'results') return text.includes({TABLE_ONE!r}) && plots >= 1 && all('[data-testid=stDataFrame]').length >= 2;
  return !!progress && text.includes('Epochs done') && (plots >= 1 || text.includes('Curves appear after the first epoch.'));
}}"""

ERRORS_ON_PAGE_JS = """() => Array.from(document.querySelectorAll(
  '[data-testid=stException], [data-testid=stAlertContentError]')).map(e => e.innerText.slice(0, 2000))"""

# Opening a page by its own URL (/runs), Streamlit's frontend first looks for its server under that
# path (/runs/_stcore/health, /runs/_stcore/host-config), gets 404, then uses the root: two expected
# failed requests per load (streamlit/streamlit#7074). Counted apart, not as errors.
BASE_PATH_PROBE = re.compile(r"/runs/_stcore/(health|host-config)$")

_started = time.monotonic()  # main() sets it again


def say(message: str) -> None:
    """Where the bench is, on stderr: the setup alone takes minutes on a busy CPU."""
    print(f"[{time.monotonic() - _started:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Fixture: data, runs, worker, server


def base_env(home: Path) -> dict[str, str]:
    # The bench's own APP_HOME and SQLite database, whatever the calling shell points at.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "IMPORT_ROOTS")}
    env.update(APP_HOME=str(home), DEFAULT_WEIGHTS="none", HEARTBEAT_SECONDS="1", PYTHONUNBUFFERED="1")
    return env


def prepare_home(home: Path, finished: int, train_epochs: int) -> tuple[list[int], int]:
    """A synthetic dataset, `finished` short runs and one long one, all queued; returns their ids.

    The long run is created last, so it is the newest: the run the Runs page shows first.
    """
    from core.config import load_settings
    from core.data.ingest import ingest
    from core.jobs.runs import create_runs
    from core.store.engine import make_sessionmaker
    from core.training.run_config import RunConfig
    from tests.synthetic import write_dataset

    settings = load_settings({"APP_HOME": str(home)})
    Session = make_sessionmaker(settings.database_url)
    source = write_dataset(home.parent / "data", per_class=8)
    # 12 augmented training images at 32 px: a finished run is one step of one epoch; the long run
    # takes small steps, so that it records progress every few seconds even on a busy CPU.
    tiny = {"dataset": "synthetic", "weights": "none", "image_size": 32, "per_class": 4, "device": "cpu"}
    with Session.begin() as s:
        ingest(s, settings, source, "synthetic", user=LOCAL_USER)
        short = [
            create_runs(s, settings, RunConfig(**tiny, epochs=1, batch_size=12, seed=i), user=LOCAL_USER)[0].id
            for i in range(finished)
        ]
        long = create_runs(s, settings, RunConfig(**tiny, epochs=train_epochs, batch_size=2, seed=99), user=LOCAL_USER)[
            0
        ].id
    return short, long


def run_state(home: Path, run_id: int) -> dict[str, Any]:
    """Status, recorded epochs and training steps done (counted from the run's start) of one run."""
    from core.config import load_settings
    from core.store.db import Run
    from core.store.engine import make_sessionmaker

    Session = make_sessionmaker(load_settings({"APP_HOME": str(home)}).database_url)
    with Session() as s:
        run = s.get(Run, run_id)
        p = run.progress or {}
        steps = (int(p["epoch"]) - 1) * int(p["steps"]) + int(p.get("step", 0)) if p.get("steps") else 0
        return {"status": run.status.value, "epochs": len(run.epochs), "steps": steps, "error": run.error}


def wait_for_runs(home: Path, finished: list[int], training: int, worker: subprocess.Popen, timeout: float) -> None:
    """Until the short runs have succeeded and the long one has taken its first training step."""
    deadline = time.monotonic() + timeout
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log")
        states = {i: run_state(home, i) for i in [*finished, training]}
        bad = {i: st for i, st in states.items() if st["status"] in ("failed", "cancelled")}
        if bad:
            raise RuntimeError(f"a run of the fixture did not train: {bad}")
        if all(states[i]["status"] == "succeeded" for i in finished) and states[training]["steps"] > 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs not ready after {timeout:.0f} s: {states}")
        time.sleep(1)


def start_worker(home: Path, slots: int, threads: int, log: Path) -> subprocess.Popen:
    # Enough slots to train every run of the fixture at once, so the setup waits for the slowest only.
    # Its training processes inherit the thread count: torch's OpenMP threads spin at every layer's
    # barrier, so on a CPU with more runnable threads than cores each of DenseNet's thousands of
    # operations waits for a descheduled thread, and a step slows down by an order of magnitude.
    env = base_env(home)
    env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "core", "worker", "--slots", str(slots)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_server(home: Path, port: int, log: Path, options: list[str]) -> subprocess.Popen:
    """`streamlit run` as the browser tests start it (tests/server.py); `options` are more KEY=VALUE settings."""
    from tests.server import start_app

    env = base_env(home)
    env.update(START_WORKER="0", AUTH_MODE="none")  # the bench runs its own worker; the app stays open
    with open(log, "ab") as out:
        return start_app(port, env, out, options)


def stop(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process's own group (it was started in a new session), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def clip(text: str, keep: int = 1500) -> str:
    """A long traceback's first and last lines: where a chain of exceptions began and ended."""
    return text if len(text) <= 2 * keep else text[:keep] + "\n  [...]\n" + text[-keep:]


def server_log_errors(log: Path) -> list[str]:
    """Tracebacks and ERROR lines the server logged (a failure the browser may not have been shown)
    until it was told to stop: a websocket the stopping server is still closing can log a traceback
    of its own (starlette's WebSocketDisconnected), which is not what is measured."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = text.split("\n  Stopping...", 1)[0].splitlines()
    found: list[str] = []
    block: list[str] = []  # the traceback being read, with the exceptions chained to it
    state = ""  # frames: inside a traceback; done: after its exception line; chained: after "During handling..."
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            if state != "chained" and block:
                found.append(clip("\n".join(block).strip()))
                block = []
            block.append(line)
            state = "frames"
        elif state == "frames":
            block.append(line)
            if line.strip() and not line.startswith((" ", "\t")):
                state = "done"  # the exception line
        elif state in ("done", "chained") and (
            not line.strip()
            or line.startswith(("During handling of the above exception", "The above exception was the direct cause"))
        ):
            block.append(line)
            state = "chained" if line.strip() else state
        else:
            if block:
                found.append(clip("\n".join(block).strip()))
                block, state = [], ""
            if " ERROR " in line:
                found.append(line)
    if block:
        found.append(clip("\n".join(block).strip()))
    return found


# ---------------------------------------------------------------------------------------------
# The machine and who used its CPU


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it has exited
        table[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def cpu_snapshot(roots: dict[str, int]) -> dict[str, Any]:
    """CPU seconds so far of each process in each named tree ({pid: seconds}), and of the whole
    machine ("all": busy seconds of all cores)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    taken: set[int] = set()
    out: dict[str, Any] = {}
    for name, root in roots.items():  # in order: a tree inside an earlier one is not counted again
        stack, tree = [root], {}
        while stack:
            pid = stack.pop()
            if pid in taken or pid not in table:
                continue
            taken.add(pid)
            tree[pid] = table[pid][1]
            stack.extend(children.get(pid, []))
        out[name] = tree
    busy = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    out["all"] = (sum(busy) - busy[3] - busy[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait
    return out


def cores_used(start: dict[str, Any], end: dict[str, Any], seconds: float) -> dict[str, float]:
    """Mean cores each tree used between two snapshots; "other" is everything else on the machine.
    Processes alive at the end count from the start (or from their birth); one that ended in between
    is missed, so the figures are lower bounds (the long-lived server, worker and browser dominate)."""
    used = {
        name: sum(t - start[name].get(pid, 0.0) for pid, t in tree.items()) / seconds
        for name, tree in end.items()
        if name != "all"
    }
    used["other"] = max(0.0, (end["all"] - start["all"]) / seconds - sum(used.values()))
    return {name: round(v, 2) for name, v in used.items()}


# ---------------------------------------------------------------------------------------------
# Sessions: chromium pages and protocol clients


@dataclass
class Render:
    session: int
    client: str  # browser or protocol (see ProtocolSession)
    view: str  # live: the training run after loading /runs; results: a finished run picked in the select box
    run: int
    seconds: float
    at: float  # seconds since the sessions opened (the timed phase starts at Recorder.timed_from)
    first: bool  # the session's first load of /runs, before the timed phase (a browser's cache is empty)


@dataclass
class Recorder:
    t0: float
    renders: list[Render] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    expected: int = 0  # the frontend's base-path probes (see BASE_PATH_PROBE)
    timed_from: float = 0.0  # seconds after t0 when the timed phase started

    def error(self, session: int, kind: str, message: str) -> None:
        self.errors.append(
            {"session": session, "kind": kind, "at": round(time.monotonic() - self.t0, 2), "message": message[:4000]}
        )


def watch(page, record: Recorder, session: int) -> None:
    """Record a page's uncaught exceptions, console errors and failed requests as errors."""

    def console(msg) -> None:
        if msg.type != "error":
            return
        if msg.text.startswith("Failed to load resource") and BASE_PATH_PROBE.search(msg.location.get("url", "")):
            record.expected += 1
        else:
            record.error(session, "console error", f"{msg.text} ({msg.location.get('url', '')})")

    def response(r) -> None:
        if r.status < 400:
            return
        if r.status == 404 and BASE_PATH_PROBE.search(r.url):
            record.expected += 1
        else:
            record.error(session, "HTTP failure", f"{r.status} {r.url}")

    def failed(request) -> None:
        # Leaving a page cancels what it still loads (net::ERR_ABORTED); that is the test navigating.
        if "ERR_ABORTED" not in (request.failure or ""):
            record.error(session, "HTTP failure", f"{request.failure} {request.url}")

    page.on("pageerror", lambda exc: record.error(session, "page exception", str(exc)))
    page.on("console", console)
    page.on("response", response)
    page.on("requestfailed", failed)


class Session:
    """One user. `load` and `pick` draw a view and record its render time, or an error."""

    client = ""

    def __init__(self, number: int, record: Recorder, url: str, timeout_s: float, think: float) -> None:
        self.number, self.record, self.url, self.timeout_s, self.think = number, record, url, timeout_s, think
        self.rng = random.Random(number)
        self.visits = 0

    async def load(self, training: int, first: bool = False) -> bool:
        """Open /runs: the newest run, the training one, shows."""
        raise NotImplementedError

    async def pick(self, run_id: int) -> bool:
        """Choose run `run_id` in the "Run" select box."""
        raise NotImplementedError

    async def close(self) -> None:
        pass

    async def timed(self, view: str, run_id: int, action: Callable, done: Callable, first: bool = False) -> bool:
        """`action()`, then `done()` until the view is drawn; the time between is the render time.
        An action may return the moment to time from. False when it failed (recorded as an error)."""
        record, start = self.record, time.monotonic()
        try:
            start = await action() or start
            await done(view, run_id)
        except Exception as exc:  # noqa: BLE001 - a timeout or a broken page is a result, not a crash
            record.error(self.number, "render failed", f"{view} run {run_id}: {type(exc).__name__}: {exc}")
            await self.failed()
            return False
        record.renders.append(
            Render(self.number, self.client, view, run_id, time.monotonic() - start, start - record.t0, first)
        )
        return True

    async def failed(self) -> None:
        pass

    async def until(self, deadline: float, finished: list[int], training: int) -> None:
        """Visits until the deadline (at least one): load /runs, pick the next finished run, pause."""
        while self.visits == 0 or time.monotonic() < deadline:
            if await self.load(training):
                await self.pick(finished[(self.number + self.visits) % len(finished)])
            self.visits += 1
            await asyncio.sleep(self.rng.uniform(0.5, 1.5) * self.think)


class BrowserSession(Session):
    """A chromium context (own cookies and cache) and page: what a user's browser does and draws."""

    client = "browser"

    def __init__(self, *args: Any, browser: Any, shots: Path) -> None:
        super().__init__(*args)
        self.browser, self.shots, self.page = browser, shots, None

    async def open(self) -> None:
        self.context = await self.browser.new_context(viewport=VIEWPORT)
        self.page = await self.context.new_page()
        self.page.set_default_timeout(self.timeout_s * 1000)
        watch(self.page, self.record, self.number)

    async def close(self) -> None:
        await self.context.close()

    async def drawn(self, view: str, run_id: int) -> None:
        # No head start is needed: until the rerun has drawn the chosen run's heading, no state of
        # the page passes, and a fresh page has nothing stale.
        await self.page.wait_for_function(RENDERED_JS, arg=[run_id, view], polling=100, timeout=self.timeout_s * 1000)
        for text in await self.page.evaluate(ERRORS_ON_PAGE_JS):
            self.record.error(self.number, "error on page", text)

    async def failed(self) -> None:
        if len(self.record.errors) <= 20:
            with contextlib.suppress(Exception):
                name = f".failed-{self.number}-{len(self.record.errors)}.png"
                await self.page.screenshot(path=str(self.shots.with_suffix(name)))

    async def load(self, training: int, first: bool = False) -> bool:
        async def go() -> None:
            await self.page.goto(self.url + "/runs", wait_until="commit")

        return await self.timed("live", training, go, self.drawn, first)

    async def pick(self, run_id: int) -> bool:
        # Timed from the click on the option: opening the list is the browser's work, not the app's.
        from playwright.async_api import TimeoutError as PlaywrightTimeout

        option = self.page.get_by_role("option", name=re.compile(rf"^Run {run_id} ·"))

        async def choose() -> float:
            for attempt in range(3):
                await self.page.get_by_test_id("stSelectbox").first.click()
                try:
                    await option.wait_for(timeout=15_000)
                    break
                except PlaywrightTimeout:
                    if attempt == 2:
                        raise
            start = time.monotonic()
            await option.click()
            return start

        return await self.timed("results", run_id, choose, self.drawn)


class ProtocolSession(Session):
    """Streamlit's own websocket protocol, as the browser speaks it (the messages were read off
    chromium's websocket): one connection per page load, a `rerun_script` message naming the page,
    the widgets' states with each rerun, and a fragment rerun every `interval` seconds after the
    server's `auto_rerun` (the live panel's 2 s refresh). The server does all of its work for such a
    session, but nothing is drawn: its render time ends when the server has sent the whole page
    (`script_finished`), with the view's content checked in the elements received."""

    client = "protocol"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.ws = self.reader = self.ticker = None
        self.closing: list[asyncio.Task] = []
        self.page_hash = ""
        self.elements: list[Any] = []  # of the run under way or last finished
        self.widgets: dict[str, Any] = {}  # id -> WidgetState of the page's widgets, as last sent
        self.run_options: list[str] = []
        self.finished: asyncio.Queue[int] = asyncio.Queue()

    def client_state(self, **fields: Any) -> Any:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        msg = BackMsg()
        state = msg.rerun_script
        if self.page_hash:  # once the server has said which page it runs, by its hash
            state.page_script_hash = self.page_hash
        else:
            state.page_name = "runs"
        state.widget_states.widgets.extend(self.widgets.values())
        info = state.context_info
        info.timezone, info.locale, info.url, info.color_scheme = "UTC", "en-US", self.url + "/runs", "light"
        for name, value in fields.items():
            setattr(state, name, value)
        return msg

    async def send(self, msg: Any) -> None:
        await self.ws.send(msg.SerializeToString())

    async def read(self, ws: Any) -> None:
        """Follow one page's connection; messages still arriving after leaving it are dropped."""
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
        from websockets.exceptions import ConnectionClosed

        try:
            async for data in ws:
                if ws is not self.ws:
                    return
                msg = ForwardMsg()
                msg.ParseFromString(data)
                kind = msg.WhichOneof("type")
                if kind == "navigation":
                    self.page_hash = msg.navigation.page_script_hash
                elif kind == "delta" and msg.delta.WhichOneof("type") == "new_element":
                    self.element(msg.delta.new_element)
                elif kind == "auto_rerun":
                    self.start_ticker(msg.auto_rerun.interval, msg.auto_rerun.fragment_id)
                elif kind == "stop_auto_rerun":
                    self.stop_ticker()
                elif kind == "script_finished":
                    self.finished.put_nowait(msg.script_finished)
        except ConnectionClosed as exc:
            if ws is self.ws:  # not closed by leaving the page
                self.record.error(self.number, "websocket closed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a message this client cannot follow: say so, not hang
            self.record.error(self.number, "protocol client", f"{type(exc).__name__}: {exc}")
            self.finished.put_nowait(-1)

    def element(self, element: Any) -> None:
        from streamlit.proto.Alert_pb2 import Alert
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        self.elements.append(element)
        kind = element.WhichOneof("type")
        if kind == "exception":
            e = element.exception
            self.record.error(self.number, "error on page", f"{e.type}: {e.message}\n" + "\n".join(e.stack_trace))
        elif kind == "alert" and element.alert.format == Alert.ERROR:
            self.record.error(self.number, "error on page", element.alert.body)
        # The widgets' states go with every rerun, as the browser sends them: the page's first draw
        # gives their defaults; later the user's choice (pick) replaces the select box's.
        elif kind == "selectbox" and element.selectbox.label == "Run":
            box = element.selectbox
            self.run_options = list(box.options)
            if box.id not in self.widgets:  # its value: set from session state, else the default option
                self.widgets[box.id] = WidgetState(id=box.id, string_value=box.raw_value or box.options[box.default])
        elif kind == "multiselect" and element.multiselect.id not in self.widgets:
            state = WidgetState(id=element.multiselect.id)
            state.string_array_value.SetInParent()  # nothing chosen
            self.widgets[state.id] = state

    def start_ticker(self, interval: float, fragment_id: str) -> None:
        self.stop_ticker()

        async def tick() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.send(self.client_state(fragment_id=fragment_id, is_auto_rerun=True))

        self.ticker = asyncio.create_task(tick())

    def stop_ticker(self) -> None:
        if self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None

    async def script_run(self, view: str, run_id: int) -> None:
        """Until the page's script run has finished and everything the view shows has arrived.

        Both are needed: when the server is slow to send, a fragment rerun that starts before the
        page's messages have gone out drops the fragment's part of them from the send queue and
        sends its own afterwards (streamlit.runtime.forward_msg_queue.clear), so the live panel
        can arrive after the page's "finished". A browser draws it then too."""
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        statuses = ForwardMsg.DESCRIPTOR.fields_by_name["script_finished"].enum_type.values_by_number
        deadline = time.monotonic() + self.timeout_s
        page_done = False
        while True:  # fragment runs finish in between; a run stopped for a newer one is not the end
            try:
                status = await asyncio.wait_for(self.finished.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if not page_done:
                    raise
                kinds = [e.WhichOneof("type") for e in self.elements]
                headings = [e.heading.body for e in self.elements if e.WhichOneof("type") == "heading"]
                raise RuntimeError(
                    f"the page was sent without {self.missing(view, run_id)}; it had {len(kinds)} "
                    f"elements ({', '.join(sorted(set(kinds)))}), headings {headings}"
                ) from None
            if status not in statuses:
                raise RuntimeError("the protocol client stopped reading (see its error)")
            name = statuses[status].name
            if name not in ("FINISHED_SUCCESSFULLY", "FINISHED_FRAGMENT_RUN_SUCCESSFULLY", "FINISHED_EARLY_FOR_RERUN"):
                raise RuntimeError(f"script run ended {name}")
            page_done = page_done or name == "FINISHED_SUCCESSFULLY"
            if page_done and not self.missing(view, run_id):
                return

    def missing(self, view: str, run_id: int) -> str:
        kinds = [e.WhichOneof("type") for e in self.elements]
        texts = [
            e.heading.body
            if k == "heading"
            else e.markdown.body
            if k == "markdown"
            else e.metric.label
            if k == "metric"
            else ""
            for e, k in zip(self.elements, kinds)
        ]
        if not any(re.match(rf"Run {run_id}\b", t) for t, k in zip(texts, kinds) if k == "heading"):
            return f"the heading of run {run_id}"
        if view == "results":
            ok = any(TABLE_ONE in t for t in texts) and "plotly_chart" in kinds and kinds.count("dataframe") >= 2
            return "" if ok else "Table I, the confusion matrix or the tables"
        ok = (
            "progress" in kinds
            and "Epochs done" in texts
            and ("plotly_chart" in kinds or any("Curves appear" in t for t in texts))
        )
        return "" if ok else "the progress, the metrics or the curves"

    async def load(self, training: int, first: bool = False) -> bool:
        import websockets

        async def connect() -> None:
            self.leave()
            self.widgets, self.page_hash, self.elements = {}, "", []
            self.finished = asyncio.Queue()
            ws_url = "ws" + self.url.removeprefix("http") + "/_stcore/stream"
            # No keepalive pings: a browser sends none, and a server too busy to answer one in time
            # would see the connection dropped by the client, which no user's browser would do.
            self.ws = await websockets.connect(
                ws_url, subprotocols=["streamlit"], max_size=None, open_timeout=self.timeout_s, ping_interval=None
            )
            self.reader = asyncio.create_task(self.read(self.ws))
            await self.send(self.client_state())

        return await self.timed("live", training, connect, self.script_run, first)

    async def pick(self, run_id: int) -> bool:
        async def choose() -> None:
            label = next(o for o in self.run_options if o.startswith(f"Run {run_id} ·"))
            selectbox = next(w for w in self.widgets.values() if w.id.endswith("-runs_selected"))
            selectbox.string_value = label
            self.stop_ticker()  # the browser stops a fragment's timer when the page reruns
            self.elements = []
            await self.send(self.client_state())

        return await self.timed("results", run_id, choose, self.script_run)

    def leave(self) -> None:
        """Leave the page: stop its timer and close its connection without waiting for the server's
        answer, as a browser does when it navigates (the closing handshake is not timed)."""
        self.stop_ticker()
        if self.ws is not None:
            ws, reader, self.ws = self.ws, self.reader, None

            async def close() -> None:
                await ws.close()
                with contextlib.suppress(Exception):
                    await reader

            self.closing.append(asyncio.create_task(close()))

    async def close(self) -> None:
        self.leave()
        await asyncio.gather(*self.closing, return_exceptions=True)


async def drive(
    url: str,
    sessions: int,
    browsers: int,
    duration: float,
    finished: list[int],
    training: int,
    think: float,
    timeout_s: float,
    shots: Path,
    ready: Callable[[], None],
    snapshot: Callable[[], dict[str, Any]],
) -> tuple[Recorder, list[dict[str, Any]], float, str]:
    """While `ready()` waits for the fixture's runs: every session's first load of /runs (empty
    browser cache, cold server), spread over `think` seconds. Then the timed phase: visits for
    `duration` seconds. The first `browsers` sessions are chromium contexts, the others speak the
    protocol. Returns the record, `snapshot()` at the start and the end of the timed phase, the
    first loads' seconds, and chromium's version."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        runs_ready = asyncio.create_task(asyncio.to_thread(ready))
        try:
            record = Recorder(time.monotonic())
            users: list[Session] = []
            for i in range(sessions):
                if i < browsers:
                    user = BrowserSession(i, record, url, timeout_s, think, browser=browser, shots=shots)
                    await user.open()
                else:
                    user = ProtocolSession(i, record, url, timeout_s, think)
                users.append(user)

            async def first(user: Session) -> None:
                await asyncio.sleep(user.rng.uniform(0, think))  # not all in the same instant
                await user.load(training, first=True)

            await asyncio.gather(*(first(u) for u in users))
            first_loads = time.monotonic() - record.t0
        finally:
            await runs_ready  # its errors (a fixture run failed) are the ones to see
        say(f"{sessions} session(s) for {duration:.0f} s")
        snapshots = [snapshot()]
        record.timed_from = time.monotonic() - record.t0
        deadline = time.monotonic() + duration
        await asyncio.gather(*(u.until(deadline, finished, training) for u in users))
        snapshots.append(snapshot())
        for user in users:
            await user.close()
        version = browser.version
        await browser.close()
    return record, snapshots, first_loads, version


# ---------------------------------------------------------------------------------------------
# Report


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that was measured, not an interpolation."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(len(ordered) * q / 100) - 1))]


def stats(renders: list[Render]) -> dict[str, Any]:
    seconds = [r.seconds for r in renders]
    figures = (
        ("p50_s", percentile(seconds, 50)),
        ("p95_s", percentile(seconds, 95)),
        ("max_s", max(seconds, default=None)),
    )
    return {"renders": len(seconds), **{k: None if v is None else round(v, 3) for k, v in figures}}


def table(result: dict[str, Any]) -> str:
    def s(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f} s"

    m, t, cpu = result["machine"], result["training"], result["cpu_cores_used"]
    lines = [
        f"## Runs page under load: {result['sessions']} sessions, {result['duration_s']:.0f} s timed"
        + "".join(f", streamlit --{o}" for o in result["streamlit_options"]),
        (
            f"machine: {m['cpu']}, {m['cores']} cores; load average {m['load_average_start']} at the start, "
            f"{m['load_average_end']} at the end; chromium {result['chromium']}; Python {m['python']}"
        ),
        (
            f"CPU cores in use during the timed phase: server {cpu['server']}, training {cpu['training']}, "
            f"chromium and the protocol clients {cpu['browser']}, everything else on the machine {cpu['other']} "
            f"(of {m['cores']})"
        ),
        (
            f"sessions: {result['browsers']} in chromium, {result['sessions'] - result['browsers']} speaking "
            "Streamlit's protocol (their render ends when the server has sent the page; nothing is drawn)"
        ),
        (
            f"the sessions' first loads (during the setup; not in 'all') took {result['first_loads_s']:.1f} s "
            f"together; think time {result['think_s']} s"
        ),
        "",
        "| renders of | sessions | renders | errors | p50 | p95 | max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["views"].items():
        errors = result["error_count"] if name == "all" else ""
        lines.append(
            f"| {name} | {row['sessions']} | {row['renders']} | {errors} | {s(row['p50_s'])} | "
            f"{s(row['p95_s'])} | {s(row['max_s'])} |"
        )
    lines += [
        "",
        f"training run {t['run']}: {t['status_end']} at the end; epochs recorded {t['epochs_start']} -> "
        f"{t['epochs_end']} (+{t['epochs_end'] - t['epochs_start']}), training steps "
        f"{t['steps_start']} -> {t['steps_end']} during the timed phase"
        + ("" if t["progressed"] else " (NO PROGRESS)"),
    ]
    for e in result["errors"][:20]:
        lines.append(f"error: session {e['session']} at {e['at']} s, {e['kind']}: {e['message']}")
    if len(result["errors"]) > 20:
        lines.append(f"... and {len(result['errors']) - 20} more errors (all in the JSON)")
    return "\n".join(lines)


def summarise(
    args: argparse.Namespace,
    argv: list[str],
    started: datetime,
    record: Recorder,
    snapshots: list[dict[str, Any]],
    first_loads: float,
    chromium: str,
    training: int,
) -> dict[str, Any]:
    """The result: figures of the timed phase, and of the first loads apart."""
    timed, end = snapshots
    elapsed = end["t"] - timed["t"]
    cores = cores_used(timed["cpu"], end["cpu"], elapsed)
    r = [x for x in record.renders if not x.first]
    count = {"browser": args.browsers, "protocol": args.sessions - args.browsers}
    views = {"all": {"sessions": args.sessions, **stats(r)}}
    for client in ("browser", "protocol"):
        if not count[client]:
            continue
        for view, what in (("live", "load of /runs (training run)"), ("results", "pick of a finished run")):
            views[f"{client}: {what}"] = {
                "sessions": count[client],
                **stats([x for x in r if x.client == client and x.view == view]),
            }
        first = [x for x in record.renders if x.first and x.client == client]
        views[f"{client}: first load, not in 'all'" + (" (empty cache)" if client == "browser" else "")] = {
            "sessions": count[client],
            **stats(first),
        }
    s0, s1 = timed["run"], end["run"]
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python -m bench.load_runs_page " + " ".join(argv),
        "sessions": args.sessions,
        "browsers": args.browsers,
        "duration_s": round(elapsed, 1),
        "think_s": args.think,
        "streamlit_options": args.streamlit_option,
        "first_loads_s": round(first_loads, 1),
        "timed_phase_from_s": round(record.timed_from, 1),
        "machine": {
            **machine(),
            "load_average_start": round(timed["load"], 2),
            "load_average_end": round(end["load"], 2),
        },
        "cpu_cores_used": cores,
        "chromium": chromium,
        "views": views,
        "error_count": len(record.errors),
        "errors": record.errors,
        "expected_404_probes": record.expected,
        "training": {
            "run": training,
            "status_end": s1["status"],
            "epochs_start": s0["epochs"],
            "epochs_end": s1["epochs"],
            "steps_start": s0["steps"],
            "steps_end": s1["steps"],
            "progressed": s1["steps"] > s0["steps"] or s1["epochs"] > s0["epochs"],
        },
        "renders": [asdict(x) | {"seconds": round(x.seconds, 3), "at": round(x.at, 2)} for x in record.renders],
    }
    result["ok"] = not record.errors and bool(r) and result["training"]["progressed"]
    return result


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load_runs_page", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions (default 20)")
    parser.add_argument(
        "--browsers",
        type=int,
        default=None,
        help="how many of the sessions are chromium contexts (default 2, or --sessions if less); "
        "the others speak Streamlit's websocket protocol, so that the server sees every "
        "session while the cores are not spent drawing pages nobody looks at",
    )
    parser.add_argument(
        "--duration", type=float, default=60, help="seconds during which sessions start new visits (default 60)"
    )
    parser.add_argument(
        "--think",
        type=float,
        default=1.0,
        help="mean pause in seconds between a session's visits, drawn from 0.5x-1.5x (default 1)",
    )
    parser.add_argument("--finished-runs", type=int, default=2, help="finished runs to pick from (default 2)")
    parser.add_argument(
        "--train-epochs",
        type=int,
        default=1000,
        help="epochs of the training run: more than it can finish during the test; the worker "
        "is stopped at the end (default 1000)",
    )
    parser.add_argument(
        "--train-threads", type=int, default=1, help="CPU threads of each training process (OMP_NUM_THREADS; default 1)"
    )
    parser.add_argument(
        "--render-timeout",
        type=float,
        default=300,
        help="seconds a render may take before it counts as an error (default 300)",
    )
    parser.add_argument(
        "--setup-timeout", type=float, default=900, help="seconds to wait for the fixture's runs to train (default 900)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "test-artifacts" / "load_runs_page.json",
        help="JSON result (default test-artifacts/load_runs_page.json); the server's and the "
        "worker's logs and screenshots of failed renders go beside it",
    )
    parser.add_argument(
        "--streamlit-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for `streamlit run` (repeatable), e.g. runner.postScriptGC=false to "
        "measure without the full garbage collection Streamlit runs after every script run",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary APP_HOME and print its path")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.finished_runs < 1 or args.duration <= 0 or args.train_threads < 1:
        parser.error("--sessions, --finished-runs and --train-threads must be at least 1, --duration positive")
    if args.browsers is None:
        args.browsers = min(2, args.sessions)
    if not 0 <= args.browsers <= args.sessions:
        parser.error("--browsers must be from 0 to --sessions")
    for option in args.streamlit_option:
        if not re.fullmatch(r"\w+\.\w+=.*", option):
            parser.error(f"--streamlit-option {option!r}: expected KEY=VALUE, e.g. runner.postScriptGC=false")
    if not CHROMIUM.exists():
        parser.error(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the load test; returns the result (also printed, and written to --out)."""
    global _started
    _started = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server_log, worker_log = args.out.with_suffix(".server.log"), args.out.with_suffix(".worker.log")
    for old in (server_log, worker_log, *args.out.parent.glob(args.out.stem + ".failed-*.png")):
        old.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="load-runs-page-"))
    home = tmp / "home"
    worker = server = None
    started = datetime.now(UTC)
    try:
        say(f"APP_HOME {home}: dataset and runs")
        finished, training = prepare_home(home, args.finished_runs, args.train_epochs)
        worker = start_worker(home, args.finished_runs + 1, args.train_threads, worker_log)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(home, port, server_log, args.streamlit_option)
        wait_healthy(url, server, 120)
        say(f"server up on {url}; first loads of /runs while runs {finished} finish and run {training} starts")

        def snapshot() -> dict[str, Any]:
            # The server and the worker are children of this process: the rest of its tree is the
            # browser, its Playwright driver, and this process driving them.
            cpu = cpu_snapshot({"server": server.pid, "training": worker.pid, "browser": os.getpid()})
            return {"t": time.monotonic(), "load": os.getloadavg()[0], "run": run_state(home, training), "cpu": cpu}

        record, snapshots, first_loads, chromium = asyncio.run(
            drive(
                url,
                args.sessions,
                args.browsers,
                args.duration,
                finished,
                training,
                args.think,
                args.render_timeout,
                args.out,
                lambda: wait_for_runs(home, finished, training, worker, args.setup_timeout),
                snapshot,
            )
        )
        say("sessions done; stopping the server and the worker")
        for text in server_log_errors(server_log):
            record.error(-1, "server log", text)
        end = snapshots[-1]["run"]
        if end["status"] != "running":
            record.error(-1, "training run", f"run {training} is {end['status']}: {end['error']}")
    finally:
        for process in (server, worker):
            if process is not None:
                stop(process)
        if args.keep:
            print(f"APP_HOME kept: {home}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    result = summarise(args, argv, started, record, snapshots, first_loads, chromium, training)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result), flush=True)
    print(f"result: {args.out}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
