"""The paper-vs-honest reproduction on a tiny synthetic dataset, through the CLI handler."""

import argparse

import pytest

from core.access.accounts import LOCAL_USER
from core.cli.reproduce import add_cli
from core.data import groups
from core.data.ingest import ingest
from tests.synthetic import write_dataset


def _parser():
    parser = argparse.ArgumentParser(prog="python -m core")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_reproduce_paper_writes_a_report_with_both_protocols(tmp_path, settings, Session, capsys):
    src = write_dataset(tmp_path / "src", per_class=12, ext=".png", size=(48, 40))
    groups.write_manifest(groups.block_manifest(src, block_size=3), tmp_path / "groups.csv")
    with Session.begin() as s:
        ingest(s, settings, src, "tiny", groups_csv=tmp_path / "groups.csv", user=LOCAL_USER)

    out = tmp_path / "report"
    args = _parser().parse_args(
        [
            "reproduce-paper",
            "tiny",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--per-class",
            "6",
            "--batch-size",
            "32",
            "--weights",
            "none",
            "--device",
            "cpu",
        ]
    )
    args.func(args, settings, Session)

    path = out / "report.md"
    assert capsys.readouterr().out.strip() == str(path)
    text = path.read_text()
    assert "paper's protocol" in text.lower() and "honest protocol" in text.lower()
    assert "LEAKY" in text and "grouped by specimen" in text
    assert text.count("Overall accuracy:") == 2  # two Table I layouts
    assert text.count("Class     Accuracy  Precision") == 2
    assert "Reduced settings on CPU, no ImageNet weights" in text
    assert "## Verdict" in text and "## Leak audit of the honest split" in text
    assert "Colour-only yardstick on this split" in text
    for name in ("confusion-paper-leaky.png", "confusion-honest.png", "curves-paper-leaky.png", "curves-honest.png"):
        assert (out / name).stat().st_size > 1000
        assert f"]({name})" in text
    assert not list(out.glob("*.tmp"))


def test_reproduce_paper_cli_help_names_its_flags(capsys):
    with pytest.raises(SystemExit) as exited:  # --help prints and exits 0; not exiting is a failure too
        _parser().parse_args(["reproduce-paper", "--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--out", "--epochs", "--image-size", "--per-class", "--batch-size", "--weights", "--seed", "--device"):
        assert flag in help_text
