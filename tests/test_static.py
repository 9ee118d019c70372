"""Every Python file of the project passes ruff's linter (pyflakes' undefined names and unused
imports, pycodestyle, import order, pyupgrade, bugbear: pyproject.toml) and is formatted by ruff.
An undefined name is an error that only shows on the code path that runs it, such as the CUDA branch
on a CPU machine."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = [sys.executable, "-m", "ruff"]


def test_ruff_check_finds_nothing():
    done = subprocess.run([*RUFF, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    done = subprocess.run([*RUFF, "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, "run `.venv/bin/ruff format .`:\n" + done.stdout + done.stderr
    assert "files already formatted" in done.stdout and int(done.stdout.split()[0]) > 100  # it read the project
