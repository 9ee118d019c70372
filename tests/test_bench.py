"""Smoke runs of the benchmarks on the CPU, so they keep working where no GPU is at hand."""

from tests.synthetic import write_dataset


def test_prediction_benchmark_reports_both_paths():
    from bench.predict import main

    text = main(["--device", "cpu", "--image-size", "32", "--batch", "4", "--repeat", "1"])
    assert "| one image, decode + predict |" in text and "speed-up" in text and "CPU" in text


def test_training_benchmark_reports_both_paths():
    from bench.train_throughput import main

    text = main(["--device", "cpu", "--image-size", "32", "--batches", "4", "--steps", "2"])
    assert "train, batch 4, 32 px" in text


def test_input_pipeline_benchmark_reports_both_paths():
    from bench.input_pipeline import main

    text = main(["--images", "2", "--samples", "8", "--workers", "1"])
    assert "augmented training images" in text


def test_paper_protocol_benchmark_reports_each_phase(tmp_path):
    from bench.paper_protocol import main

    write_dataset(tmp_path / "data", per_class=5, size=(40, 40))
    text = main(["--data", str(tmp_path / "data"), "--image-size", "32", "--per-class", "6", "--epochs", "1",
                 "--batch-size", "6", "--device", "cpu"])
    assert "| baseline (eager) |" in text and "| fast path |" in text and "speed-up (total)" in text


def test_server_cpu_benchmark_measures_both_servers():
    from bench.server_cpu import main

    shares = main(["--duration", "2"])
    assert set(shares) == {"baseline", "project"} and all(0 <= v < 2 for v in shares.values())


def test_all_benchmarks_in_one_call_name_every_part_with_a_figure_or_a_reason(tmp_path):
    import json
    import re
    import subprocess
    import sys
    from importlib.metadata import version
    from pathlib import Path

    from bench.all import PARTS
    from bench.figures import number

    out = tmp_path / "all.md"
    proc = subprocess.run([sys.executable, "-m", "bench.all", "--smoke", "--minutes", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke data: 12 JPEG images" in proc.stdout  # synthetic TIFs through bench/pack_data.py
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["environment"]["torch"].startswith(version("torch")) and "onnxruntime" in record["environment"]
    figures = [f for f in record["figures"] if f["figure"] != "warning"]
    assert {f["part"] for f in figures} == {p.title for p in PARTS}
    for f in figures:  # a measured value, or plainly why there is none
        assert number(f["value"]) is not None or re.fullmatch(r"(skipped|failed): \S.*", f["value"]), f
    assert any(number(f["value"]) is not None for f in figures)
    table = out.read_text()
    assert "| part | figure | value | baseline | ratio | device |" in table
    assert all(f"| {p.title} |" in table for p in PARTS) and "| python |" in table
