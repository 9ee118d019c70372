"""The pages read page-ready records (core/jobs/views/) and load no torch until a model is
needed; nothing reads a run's config or summary by key outside their typed records, and no page reads
the records nested in the summary by key. Static checks of the source, plus one fresh interpreter."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRONT = sorted((ROOT / "pages").glob("*.py")) + [ROOT / "streamlit_app.py"]


def imports(path: Path, top_level_only: bool) -> list[tuple[int, str]]:
    """(line, module) of each import in a file; with `top_level_only`, those a script runs as it loads
    (anywhere but inside a function or class, which run only when called)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(child, ast.If) and top_level_only and ast.unparse(child.test) == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.extend((child.lineno, f"{child.module}.{a.name}") for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


# ---------------------------------------------------------------------------------------------
# The pages


def test_pages_import_neither_sqlalchemy_nor_the_database_models():
    offending = [
        f"{p.relative_to(ROOT)}:{line}: {module}"
        for p in FRONT
        for line, module in imports(p, False)
        if re.match(r"(sqlalchemy|core\.store\.db)(\.|$)", module)
    ]
    assert not offending, "pages read records through core/jobs/views/:\n" + "\n".join(offending)


def test_loading_a_page_imports_no_torch():
    """Every module the pages import as they load, imported in a fresh interpreter one by one: none
    brings in torch (the Predict page imports the model code when it classifies)."""
    modules = sorted({m for p in FRONT for _, m in imports(p, True)})
    script = (
        "import importlib, json, sys\n"
        "culprits = []\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        importlib.import_module(name.rsplit('.', 1)[0])  # `from package import name`\n"
        "    if 'torch' in sys.modules and not culprits:\n"
        "        culprits.append(name)\n"
        "print(json.dumps(culprits))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [], "imports torch as a page loads"
    assert len(modules) > 10  # the walk found the pages' imports


def test_pages_read_no_nested_record_by_key():
    """A run's calibration, leak audit, colour yardstick and uncertainty (and a model file's calibration) reach the
    pages as typed records (core/store/records.py): no page reads them by key, neither through the
    summary (`summary.calibration["x"]`) nor by a field's name (`cal["val_probs"]`, `.get("temperature")`)."""
    from core.store.records import CalibrationRecord, LeakAudit, Yardstick

    fields = {f.name for record in (CalibrationRecord, LeakAudit, Yardstick) for f in dataclasses.fields(record)}
    fields -= {"verdict"}  # also a column of the Predict page's results table, read by name as pandas does
    pattern = re.compile(
        r"""(calibration|leak_audit|colour_yardstick|uncertainty)\s*(\[|\.get\()"""
        rf"""|(\[|\.get\()\s*["']({"|".join(sorted(fields))})["']"""
    )
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in FRONT
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
    assert pattern.search('help=leak["summary"]') and pattern.search('record.get("temperature")')
    assert pattern.search('summary.calibration["anything"]') and not pattern.search('table["predicted"]')


def test_nothing_reads_a_runs_config_or_summary_by_key():
    """RunConfig.from_dict, RunSummary.from_dict and RunProgress.from_dict are the only readers."""
    pattern = re.compile(r"""(config|summary)(\[["']|\.get\(["'])""")
    files = sorted((ROOT / "core").rglob("*.py")) + FRONT
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
