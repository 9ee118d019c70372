"""RunConfig's fields are the one list of run settings: the CLI's flags and the Train page's form are
both made from them, with the help, defaults and bounds their metadata gives."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.__main__ import build_parser, config_from_args
from core.access.accounts import LOCAL_USER
from core.cli.reproduce import RUN_FLAGS
from core.data.ingest import ingest
from core.jobs import estimate
from core.training.run_config import RunConfig, flag_of, settings_fields
from tests.synthetic import write_dataset

APP = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
WIDGETS = ("number_input", "selectbox", "radio", "checkbox", "text_input")


def subcommand(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_every_run_setting_has_a_flag_or_says_why_not():
    fields = dataclasses.fields(RunConfig)
    internal = [f for f in fields if "internal" in f.metadata]
    assert {f.name for f in settings_fields()} | {f.name for f in internal} == {f.name for f in fields}
    assert all(f.metadata["internal"] for f in internal)  # a reason, not just a mark
    train = {option: action for action in subcommand("train")._actions for option in action.option_strings}
    for f in settings_fields():
        action = train[flag_of(f)]
        assert action.dest == f.name and action.help == f.metadata["help"]
        assert action.choices == f.metadata.get("choices")
    for f in internal:
        assert flag_of(f) not in train
    # reproduce-paper's flags are the same ones (a subset), made the same way.
    reproduce = {o for action in subcommand("reproduce-paper")._actions for o in action.option_strings}
    assert {flag_of(f) for f in settings_fields(RUN_FLAGS)} <= reproduce


def test_the_flags_defaults_are_the_configs(settings):
    args = build_parser().parse_args(["train", "--dataset", "x"])
    assert config_from_args(args, settings) == RunConfig(dataset="x", weights=settings.default_weights)
    args = build_parser().parse_args(
        [
            "train",
            "--dataset",
            "x",
            "--no-grouped",
            "--tta",
            "--augment",
            "zoom_probability=0.5",
            "--hed-jitter",
            "0.05",
            "--split",
            "kfold",
            "--folds",
            "3",
        ]
    )
    config = config_from_args(args, settings)
    assert (config.grouped, config.tta, config.augment_params.zoom_probability, config.hed_jitter, config.folds) == (
        False,
        True,
        0.5,
        0.05,
        3,
    )


@pytest.mark.parametrize("split", ["holdout", "kfold"])
def test_every_run_setting_has_an_input_on_the_train_page(split, settings, monkeypatch, tmp_path):
    write_dataset(tmp_path / "src", per_class=4)
    from core.store.engine import make_sessionmaker

    with make_sessionmaker(settings.database_url).begin() as s:
        ingest(s, settings, tmp_path / "src", "grouped", group_pattern=r"^[^/]+/\d\d(\d)", user=LOCAL_USER)
    monkeypatch.setenv("APP_HOME", str(settings.app_home))
    monkeypatch.setenv("START_WORKER", "0")
    monkeypatch.setattr(estimate, "machine_summary", lambda: estimate.MachineSummary(("a GPU",), 2))  # paper defaults
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.switch_page("pages/train.py").run()
    at.radio(key="tr_split").set_value(split).run()
    assert not at.exception and not at.error
    inputs = {w.key: w for kind in WIDGETS for w in at.get(kind)}
    for f in settings_fields():
        key = "tr_" + f.metadata.get("key", f.name)
        assert key in inputs, f"no input for {f.name}"
        assert inputs[key].label.startswith(f.metadata["label"])
        if "bounds" in f.metadata:  # a number input, with the field's bounds
            assert (inputs[key].min, inputs[key].max) == f.metadata["bounds"]
        applies = split in f.metadata.get("splits", (split,))
        assert inputs[key].disabled == (not applies), f.name
    for f in settings_fields():
        if "bounds" in f.metadata:  # each starts at the paper's value
            assert inputs["tr_" + f.metadata.get("key", f.name)].value == f.default
