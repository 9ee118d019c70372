"""Every Python file of the project passes pyflakes: no undefined name (an error that only shows on
the code path that runs it, such as the CUDA branch on a CPU machine), no unused import."""

import io
from pathlib import Path

from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing():
    files = [p for d in ("core", "pages", "bench", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    files += [ROOT / "streamlit_app.py", ROOT / "serve.py"]
    out = io.StringIO()
    reporter = Reporter(out, out)
    problems = sum(checkPath(str(p), reporter) for p in files)
    assert problems == 0, out.getvalue()
    assert len(files) > 40  # the walk found the project
