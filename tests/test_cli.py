"""The command line, run as a user would: separate processes, exit codes, stdout to parse."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.synthetic import synthetic_image, write_dataset

ROOT = Path(__file__).resolve().parents[1]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "APP_HOME": str(home), "OMP_NUM_THREADS": "2"}
    env.pop("DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


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

    out = cli(home, "train", "--dataset", "toy", "--epochs", "1", "--image-size", "32", "--per-class", "6",
              "--weights", "none", "--batch-size", "9", "--val-fraction", "0.25")
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip().splitlines()[-1]
    assert run_id.isdigit()

    out = cli(home, "evaluate", run_id)
    assert out.returncode == 0, out.stderr
    for column in ("Class", "Accuracy", "Precision", "Recall", "F1", "Support", "Confusion matrix", "Protocol: holdout",
                   "Colour-only yardstick on this split"):
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
    assert header == ("image_name,image_sha256,width,height,size_bytes,predicted,probability_kind,refer,"
                      "refer_threshold,refer_target,run_id,model_sha256,CLL,FL,MCL")
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
