"""Smoke runs of the benchmarks on the CPU, so they keep working where no GPU is at hand."""

# Each benchmark's own smoke run is the --smoke run of bench.all below, which runs every one of them.
# bench/server_cpu.py (a browser and two web servers, about 45 s) is run by hand; the suite is kept
# under its 15 minutes for the new user's path in tests/test_browser.py.


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
    proc = subprocess.run(
        [sys.executable, "-m", "bench.all", "--smoke", "--minutes", "4", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smoke data: 12 JPEG images" in proc.stdout  # synthetic TIFs through bench/pack_data.py
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["environment"]["torch"].startswith(version("torch")) and "onnxruntime" in record["environment"]
    figures = [f for f in record["figures"] if f["figure"] != "warning"]
    assert {f["part"] for f in figures} == {p.title for p in PARTS}
    for f in figures:  # a measured value, or plainly why there is none
        assert number(f["value"]) is not None or re.fullmatch(r"(skipped|failed): \S.*", f["value"]), f
    # On the CPU nothing is skipped for want of a GPU: every part measures its figures and none fails.
    for part in PARTS:
        assert any(f["part"] == part.title and number(f["value"]) is not None for f in figures), part.title
    assert not [f for f in figures if f["value"].startswith("failed")], figures
    table = out.read_text()
    assert "| part | figure | value | baseline | ratio | device |" in table
    assert all(f"| {p.title} |" in table for p in PARTS) and "| python |" in table
