"""The command line, run as a user would: separate processes, exit codes, stdout to parse; in-process
`main([...])` where what a command prints and returns is the point."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.synthetic import synthetic_image, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "APP_HOME": str(home), "OMP_NUM_THREADS": "2"}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "core", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", ["ingest", "train", "evaluate", "predict", "runs", "datasets", "reproduce-paper"])
def test_every_command_has_help(tmp_path, command):
    out = cli(tmp_path, command, "--help")
    assert out.returncode == 0
    assert "usage: python -m core " + command in out.stdout


def test_ingest_train_evaluate_predict(tmp_path):
    home = tmp_path / "home"
    write_dataset(tmp_path / "data", per_class=10, ext=".tif")
    out = cli(home, "ingest", str(tmp_path / "data"), "--name", "toy")
    assert out.returncode == 0, out.stderr
    assert "30 added" in out.stdout

    out = cli(
        home,
        "train",
        "--dataset",
        "toy",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--per-class",
        "6",
        "--weights",
        "none",
        "--batch-size",
        "9",
        "--val-fraction",
        "0.25",
    )
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    assert run_id.isdigit()

    out = cli(home, "evaluate", run_id)
    assert out.returncode == 0, out.stderr
    for column in (
        "Class",
        "Accuracy",
        "Precision",
        "Recall",
        "F1",
        "Support",
        "Confusion matrix",
        "Protocol: holdout",
        "Colour-only yardstick on this split",
    ):
        assert column in out.stdout
    for label in ("CLL", "FL", "MCL"):
        assert label in out.stdout
    # The calibration in the pages' words and rounding (calibration_words), with its technical terms.
    assert "Calibration: Confidence adjusted on the run's" in out.stdout and "T = " in out.stdout

    image = tmp_path / "x.tif"
    synthetic_image("MCL", 50).save(image)
    out = cli(home, "predict", "--run", run_id, str(image))
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.strip().splitlines()
    # The run's calibrated class probabilities (it has a validation part), saying so, and its refer verdict.
    # A prediction's fields as the API and the log name them, then one column per class.
    assert header == (
        "image_name,image_sha256,width,height,size_bytes,predicted,probability_kind,refer,"
        "refer_threshold,refer_target,run_id,model_sha256,CLL,FL,MCL"
    )
    assert row.split(",")[6] == "calibrated" and row.split(",")[7] in ("0", "1")
    assert abs(sum(float(v) for v in row.split(",")[12:15]) - 1) < 0.01

    out = cli(home, "runs")
    assert out.returncode == 0 and "succeeded" in out.stdout


def test_user_errors_exit_2_with_one_line_and_change_nothing(tmp_path):
    home = tmp_path / "home"
    write_dataset(tmp_path / "data", per_class=6)
    assert cli(home, "ingest", str(tmp_path / "data"), "--name", "toy").returncode == 0

    cases = [
        ("train", "--dataset", "nope", "--weights", "none"),
        ("train", "--dataset", "toy", "--weights", str(tmp_path / "missing.pth")),
        ("train", "--dataset", "toy", "--weights", "none", "--augment", "bogus=1"),
        ("ingest", str(tmp_path / "no-such-folder"), "--name", "x"),
        ("evaluate", "12345"),
    ]
    for args in cases:
        out = cli(home, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    out = cli(home, "runs")
    assert "succeeded" not in out.stdout and "failed" not in out.stdout  # no run was recorded


COMMANDS = (
    "ingest",
    "datasets",
    "groups",
    "train",
    "train-distributed",
    "worker",
    "cancel",
    "status",
    "resume",
    "workers",
    "runs",
    "evaluate",
    "export",
    "reproduce-paper",
    "approve",
    "withdraw",
    "approvals",
    "predict",
    "predict-slide",
    "predictions",
    "check",
    "migrate",
    "accounts",
    "token",
)


def test_help_lists_every_command(tmp_path):
    from core.__main__ import build_parser

    out = cli(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^ {4}(\S+)", out.stdout, flags=re.MULTILINE))
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert listed == {name for name in commands.choices if not name.startswith("_")}  # all but the internal ones
    assert set(COMMANDS) <= listed


def _parsers(parser: argparse.ArgumentParser):
    """The parser and those of its commands, and of theirs, each once."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_every_option_with_a_default_shows_it_in_help():
    from core.__main__ import build_parser

    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.default is False:
                continue
            help_text = parser._get_formatter()._expand_help(action)  # as --help prints it
            assert "(default" in help_text, (parser.prog, action.dest, help_text)


def test_accounts_tokens_and_groups_are_commands_with_the_one_error_edge(tmp_path, capsys):
    from core.__main__ import main

    file = str(tmp_path / "accounts.toml")
    assert main(["token", "--file", file, "add", "ci", "--role", "viewer"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["token", "--file", file, "list"]) == 0
    assert capsys.readouterr().out.startswith(token.split("_")[1] + "\tci\tviewer\t")

    assert main(["accounts", "--file", file, "remove", "nobody"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No account 'nobody'") and err.count("\n") == 1
    assert main(["groups", str(tmp_path / "no-such-folder")]) == 2
    assert capsys.readouterr().err == f"error: Not a folder: {tmp_path / 'no-such-folder'}\n"


def test_the_former_entry_points_run_the_same_commands(tmp_path, capsys):
    """`python -m core.access.accounts ...` and `python -m core.data.groups ...`, where these commands
    were first, run as processes of their own, as scripts run them."""
    from core.__main__ import main

    def former(module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    file = str(tmp_path / "accounts.toml")
    made = former("core.access.accounts", "--file", file, "token", "add", "ci", "--role", "editor")
    assert made.returncode == 0 and made.stdout.startswith("lk_"), made.stderr
    assert main(["token", "--file", file, "list"]) == 0
    assert "\tci\teditor\t" in capsys.readouterr().out

    for label in ("CLL", "FL"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(4):
            (tmp_path / "src" / label / f"{i:03d}.png").write_bytes(b"")
    manifest = former("core.data.groups", str(tmp_path / "src"), "--block-size", "2")
    assert manifest.returncode == 0, manifest.stderr
    assert main(["groups", str(tmp_path / "src"), "--block-size", "2"]) == 0
    assert capsys.readouterr().out == manifest.stdout and "FL/002.png,FL-002-003" in manifest.stdout
    refused = former("core.data.groups", str(tmp_path / "no-such-folder"))
    assert refused.returncode == 2 and refused.stderr == f"error: Not a folder: {tmp_path / 'no-such-folder'}\n"
