"""Run one benchmark's `main(argv) -> str` in a process of its own, with a time limit.

Each part of bench/all.py runs this way so that a part that hangs (a compiler, a stuck worker
pool) is stopped at its limit, one that crashes or exhausts the GPU's memory takes nothing else
with it, and each starts with a fresh CUDA context. The processes fork from a "forkserver" that
has imported torch once (it never touches CUDA), so a part does not pay torch's seconds of import
again. What a part prints goes to a log file; its return value comes back through a JSON file.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ["bench.preload"]  # imports what the parts need, each import guarded

_context: multiprocessing.context.BaseContext | None = None


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "failed" or "timed out"
    text: str  # main's return value, when ok
    error: str  # one line saying what went wrong, when not ok
    seconds: float
    log: str  # everything the part printed, stdout and stderr


def _forkserver() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(module: str, argv: list[str], result: str, log: str, threads: int | None) -> None:
    os.setpgid(0, 0)  # its own process group, so that its workers are stopped with it
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes it starts
        torch.set_num_threads(threads)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    try:
        payload = {"text": str(importlib.import_module(module).main(argv))}
    except BaseException as exc:  # noqa: BLE001 - SystemExit from argparse too: reported, not raised
        if not isinstance(exc, SystemExit):  # argparse has said what was wrong already
            traceback.print_exc()
        payload = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    sys.stderr.flush()
    tmp = f"{result}.tmp"
    Path(tmp).write_text(json.dumps(payload))
    os.replace(tmp, result)


def _stop(proc: multiprocessing.process.BaseProcess) -> None:
    """The part and whatever it started and left behind (worker pools, compiler processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already (or never formed, if stopped in its first instant)
    if proc.is_alive():
        proc.kill()
    proc.join(10)


def _error_line(error: str, log: str) -> str:
    if error.startswith("SystemExit"):  # argparse says what was wrong on its last line
        lines = [line for line in log.splitlines() if line.strip()]
        return lines[-1].strip() if lines else error
    return error


def run_isolated(module: str, argv: list[str], limit_seconds: float, threads: int | None = None) -> Outcome:
    """`module.main(argv)` in its own process, stopped after `limit_seconds`; with `threads`, torch
    uses that many (on a crowded CPU, two threads that wait on each other can take ten times as
    long as one)."""
    with tempfile.TemporaryDirectory(prefix="bench-part-") as tmp:
        result, log_path = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        proc = _forkserver().Process(target=_child, args=(module, list(argv), str(result), str(log_path), threads))
        started = time.monotonic()
        proc.start()
        try:
            proc.join(max(1.0, limit_seconds))
        finally:  # an interrupt (Ctrl-C) stops the part too
            timed_out = proc.is_alive()
            _stop(proc)
        seconds = time.monotonic() - started
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if timed_out:
            return Outcome("timed out", "", f"stopped at its limit of {limit_seconds:.0f} s", seconds, log)
        if not result.exists():
            return Outcome(
                "failed", "", f"its process ended (exit code {proc.exitcode}) without a result", seconds, log
            )
        payload = json.loads(result.read_text())
    if "error" in payload:
        return Outcome("failed", "", _error_line(payload["error"], log), seconds, log)
    return Outcome("ok", payload["text"], "", seconds, log)
