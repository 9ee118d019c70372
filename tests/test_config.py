"""Each setting is declared once (core/config.py): its default, how its variable is read, what a child
process is given and what the README's table says all come from, or are checked against, that one
declaration."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from core import config
from core.config import child_env, declared, load_settings
from core.errors import UserError
from core.jobs import worker

README = Path(__file__).resolve().parents[1] / "README.md"


def test_each_setting_loaded_from_an_empty_environment_is_its_declared_default():
    loaded, expected = load_settings({}), {}
    for s in declared():
        expected[s.field] = s.derive(expected) if s.derive else s.default
        assert getattr(loaded, s.field) == expected[s.field], s.variable
    assert {s.field for s in declared()} == {f.name for f in dataclasses.fields(config.Settings)}
    # A few as they have always been, so that the declaration's values are checked, not only its plumbing.
    assert (loaded.max_zip_entries, loaded.max_user_predict_pixels, loaded.reviews) == (21_000, 4_000_000_000, True)
    assert loaded.database_url == f"sqlite:///{Path('var').resolve() / 'app.db'}" and loaded.auth_file is None


def _other(kind: config.Kind, value: Any, tmp: Path) -> Any:
    """A value of `kind` unlike `value` (a setting's default)."""
    if kind is config.BOOL:
        return not value
    if kind is config.INT:
        return value + 7
    if kind is config.FLOAT:
        return value + 0.25
    if kind is config.WORD:
        return "password" if value != "password" else "oidc"
    if kind is config.TEXT:
        return f"{value}-other"
    if kind in (config.PATH, config.OPTIONAL_PATH):
        return tmp / "elsewhere"
    if kind is config.PATHS:
        return (tmp / "a", tmp / "b")
    return ("lab.example.org", "*.example.org")


def test_a_child_process_is_given_every_setting_and_reads_back_the_same(tmp_path):
    default = load_settings({})
    changed = dataclasses.replace(
        default, **{s.field: _other(s.kind, getattr(default, s.field), tmp_path) for s in declared()}
    )
    for s in declared():
        assert getattr(changed, s.field) != getattr(default, s.field), s.variable
    assert load_settings(child_env(changed)) == changed
    # The worker starts its children with that environment, over its own (which may say otherwise).
    env = worker._child_env(changed)
    assert load_settings(env) == changed and str(worker.ROOT) in env["PYTHONPATH"]
    assert load_settings(child_env(default)) == default


def test_one_boolean_reader_refuses_what_it_cannot_read_naming_the_variable():
    for variable in ("REVIEWS", "START_WORKER", "KEEP_CHECKPOINTS", "PREDICTION_LOG_IMAGES"):
        with pytest.raises(UserError, match=rf"{variable} must be one of 1, true, yes, on or 0, false.*'maybe'"):
            load_settings({variable: "maybe"})
    s = load_settings(
        {"START_WORKER": "off", "KEEP_CHECKPOINTS": " TRUE ", "REVIEWS": "No", "PREDICTION_LOG_IMAGES": ""}
    )
    assert (s.start_worker, s.keep_checkpoints, s.reviews, s.prediction_log_images) == (False, True, False, False)
    with pytest.raises(UserError, match=r"MAX_DISK_GB must be a number, got 'lots'"):
        load_settings({"MAX_DISK_GB": "lots"})
    with pytest.raises(UserError, match=r"WORKER_SLOTS must be a whole number"):
        load_settings({"WORKER_SLOTS": "1.5"})


def _readme_table() -> dict[str, str]:
    """The README's settings table: each variable and its default as written (a row may hold two,
    'A / B' with defaults 'a / b')."""
    section = README.read_text(encoding="utf-8").split("## Settings", 1)[1].split("\n## ", 1)[0]
    found = {}
    for row in re.findall(r"^\| (`[A-Z_].*?) \| (.*?) \|", section, re.M):
        names, defaults = row[0].split(" / "), row[1].split(" / ")
        assert len(names) == len(defaults), row
        found.update({n.strip("`"): d.replace("`", "") for n, d in zip(names, defaults, strict=True)})
    return found


def test_the_readme_table_and_the_module_docstring_hold_every_setting_with_its_declared_default():
    table = _readme_table()
    assert set(table) == {s.variable for s in declared()}
    assert {v: d for v, d in table.items()} == {s.variable: s.shown for s in declared()}
    for s in declared():
        assert f"{s.variable} (default {s.shown}): {s.help}." in config.__doc__
