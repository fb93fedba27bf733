"""`virnucpro bench --quick` runs every section on tiny CPU models and writes its JSON."""
from __future__ import annotations

import json

from job.cli import main


def test_bench_quick_writes_the_table_as_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["quick"] is True and data["errors"] == []
    paths = {(row["model"].split()[0], row["path"].split()[0]) for row in data["rows"]}
    assert {("ESM-2", "fair-esm"), ("ESM-2", "ours"), ("DNABERT", "one"), ("DNABERT", "ours")} <= paths
    for row in data["rows"]:
        assert row["tokens_per_s"] > 0 and row["sequences_per_s"] > 0 and row["tokens"] > 0
    for check in data["checks"].values():
        assert check["finite"] and check["min_cosine"] > 0.9999
    pipeline = data["pipeline"]
    assert pipeline["pipeline_frames"] == pipeline["frames"] > 0
    assert pipeline["pipeline_frames_per_s"] > 0 and pipeline["esm_only_frames_per_s"] > 0
    assert data["inputs"]["frames_per_read"] == 1.5  # the synthetic reads have one or two open frames
    assert set(data["target_verdicts"]) == set(data["target_goals"])
    assert "| model | path | tokens/s |" in capsys.readouterr().out


def test_bench_outside_a_checkout_says_where_it_runs(tmp_path, monkeypatch, capsys):
    import job.cli

    monkeypatch.setattr(job.cli, "__file__", str(tmp_path / "site-packages" / "job" / "cli.py"))
    assert main(["bench", "--quick"]) == 2
    error = capsys.readouterr().err
    assert "source checkout" in error and "benchmarks/bench.py" in error
