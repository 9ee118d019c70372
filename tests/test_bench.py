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
