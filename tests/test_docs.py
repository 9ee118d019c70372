"""docs/architecture.md names every Python module of core/ and pages/, so that the map stays whole.

The rule: a module counts as named when the page holds its path (`core/jobs/estimate.py`), or when one
paragraph holds its package's path in backticks and its file name, as where a package's modules are
described together (`core/data` ... `splits.py`). A paragraph is the lines between blank lines, and
each row of a table is one. A package's `__init__.py` counts as named when the package's path is.
The Alembic revisions (core/store/migrations/versions/) are the schema's history, described with
their package, not modules to map.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"


def modules() -> list[str]:
    found = [p.relative_to(ROOT).as_posix() for top in ("core", "pages") for p in (ROOT / top).rglob("*.py")]
    return sorted(m for m in found if "/migrations/versions/" not in m)


def paragraphs(text: str) -> list[str]:
    """The page's paragraphs, with each table row apart (a table's rows form one block of lines)."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        found += [line for line in lines if line.startswith("|")]
        found.append("\n".join(line for line in lines if not line.startswith("|")))
    return found


def named(module: str, text: str, blocks: list[str]) -> bool:
    package, _, name = module.rpartition("/")
    if re.search(rf"(?<![\w/.]){re.escape(module)}", text):
        return True
    if name == "__init__.py":
        return re.search(rf"(?<![\w/.]){re.escape(package)}(?![\w.])", text) is not None
    return any(
        re.search(rf"`{re.escape(package)}/?`", block) and re.search(rf"(?<![\w/.]){re.escape(name)}", block)
        for block in blocks
    )


def test_the_rule_tells_a_named_module_from_one_that_is_not():
    text = (
        "| split → samples | `core/data` | `cache.py` (decode once), `prepare.py` |\n"
        "| the run as a job | `core/jobs` | `runs.py` |\n\n"
        "`core/slides` reads slides:\n`reader.py` opens one.\n\n"
        "core/store/migrations/ and `core/api/auth.py`; the pages read `site.py` and views.py"
    )
    blocks = paragraphs(text)
    assert named("core/data/cache.py", text, blocks) and named("core/api/auth.py", text, blocks)
    assert named("core/slides/reader.py", text, blocks) and named("core/store/migrations/__init__.py", text, blocks)
    assert not named("core/api/site.py", text, blocks)  # its package's path is not in its paragraph
    assert not named("core/jobs/prepare.py", text, blocks)  # its name is in the row of another package
    assert not named("pages/views.py", text, blocks)  # "the pages" in prose is no package path


def test_every_module_of_core_and_pages_is_named_in_the_architecture_page():
    text = PAGE.read_text(encoding="utf-8")
    blocks = paragraphs(text)
    assert len(modules()) > 50  # the walk found the code
    missing = [m for m in modules() if not named(m, text, blocks)]
    assert not missing, f"docs/architecture.md names no {', '.join(missing)} (tests/test_docs.py: the rule)"
