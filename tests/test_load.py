"""Smoke run of the Runs page load test (bench/load_runs_page.py): three sessions, one in chromium and
two speaking Streamlit's protocol, against `streamlit run` while a run trains in a worker."""

import json

from bench.load_runs_page import main


def test_runs_page_under_load_renders_without_errors_while_a_run_trains(tmp_path):
    out = tmp_path / "load.json"
    result = main(["--sessions", "3", "--browsers", "1", "--duration", "10", "--think", "0.5",
                   "--finished-runs", "1", "--out", str(out)])

    assert result["errors"] == []
    assert json.loads(out.read_text())["error_count"] == 0
    timed = [r for r in result["renders"] if not r["first"]]
    for session, client in ((0, "browser"), (1, "protocol"), (2, "protocol")):
        # every session drew both views in the timed phase: the training run, then the finished one
        drawn = {(r["client"], r["view"], r["run"]) for r in timed if r["session"] == session}
        assert drawn == {(client, "live", 2), (client, "results", 1)}
    stats = result["views"]["all"]
    assert stats["renders"] == len(timed) >= 6 and 0 < stats["p50_s"] <= stats["p95_s"] <= stats["max_s"]
    training = result["training"]
    assert training["status_end"] == "running"
    assert training["steps_end"] > training["steps_start"] > 0  # it kept training while the pages were browsed
    assert result["ok"]
