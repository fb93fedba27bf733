"""Results a virologist reads (issue 15): threshold, viral reads, per-input summary, report.

Most tests run the real worker and merge in process with scores from a fake predictor (the
scores are then known exactly); one runs `virnucpro run` with the demo models end to end.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import threading
from pathlib import Path

import dnaio
import numpy as np
import pytest
import structlog

from job import exit_codes
from job.config import RunConfig
from job.errors import RunDamaged
from job.inputs import resolve_inputs
from job.merge import FAILED, SUCCESS, MergeClaim, MergeInputs, merge
from job.plan import load_plan, plan_run
from job.store import LocalStore
from job.summary import RUN_ROW
from job.worker import Worker, WorkerSpec
from job_support import read_output, run_args, subprocess_env, write_reads
from test_job_worker import DIM, FakePredictor

PUBLISHED = ("prediction_results.txt", "prediction_results_highestscore.csv")


def _sequence(n: int, seed: int) -> str:
    return "".join(np.random.default_rng(seed).choice(list("ACGT"), n))


def start(tmp_path: Path, files: dict[str, list[tuple[str, int]]], **config: object) -> tuple[RunConfig, LocalStore]:
    """A planned run over FASTA files {name: [(read id, length), ...]}, settings as `virnucpro run` records them."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, reads in files.items():
        path = tmp_path / name
        path.write_text("".join(f">{rid}\n{_sequence(n, i)}\n" for i, (rid, n) in enumerate(reads)))
        paths.append(str(path))
    run = RunConfig(
        inputs=tuple(paths), output=str(tmp_path / "out"), esm_model="-", dnabert_model="-", classifier="-",
        **config,  # type: ignore[arg-type]
    )
    store = LocalStore(run.output)
    settings = {"chunk_length": 500, "min_virus_score": run.min_virus_score, "write_viral_reads": run.write_viral_reads}
    plan_run(store, resolve_inputs(run.inputs, None), settings, run.shard_reads, None, threading.Event())
    return run, store


def finish(run: RunConfig, store: LocalStore, predictor: FakePredictor | None = None) -> tuple[str, dict]:
    spec = WorkerSpec(run, 0, 1, 0)
    Worker(spec, store, load_plan(store), predictor or FakePredictor(3), "cpu", threading.Event()).run()  # type: ignore[arg-type]
    claim = MergeClaim(store, "test", 30.0)
    assert claim.acquire()
    return merge(store, load_plan(store), MergeInputs(False, DIM, True, None, 30.0, run.gpu_hour_price), claim, threading.Event())


def table(path: Path) -> list[dict[str, str]]:
    header, *rows = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"), strict=True)) for row in rows]


SAMPLES = {
    "a.fa": [(f"a{i:02d}", 600 + 37 * i) for i in range(14)],
    "b.fa": [(f"b{i:02d}", 620 + 11 * i) for i in range(9)] + [("b_empty", 0)],
}


def test_a_merge_that_would_lose_reads_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read of the plan is listed in reads.tsv: a merge whose parts account for fewer
    (a bug, or a damaged store) stops before any output is visible, rather than finishing a
    run with reads missing."""
    import dataclasses

    import job.merge

    run, store = start(tmp_path, SAMPLES, shard_reads=5, group_reads=2, checkpoint_seconds=0.0)
    decode = job.merge.decode_rows
    dropped: list[str] = []

    def one_read_short(data: bytes, key: str):  # the first part loses its first read
        rows = decode(data, key)
        if dropped:
            return rows
        first, rest = rows.reads.split(b"\n", 1)
        dropped.append(first.decode())
        outcomes = dict(rows.outcomes)
        fields = first.decode().split("\t")
        outcomes[fields[5] if fields[5] != "none" else fields[6]] -= 1  # its call, or why it has none
        return dataclasses.replace(rows, reads=rest, outcomes=outcomes)

    monkeypatch.setattr(job.merge, "decode_rows", one_read_short)
    with pytest.raises(RunDamaged, match="the merge listed 23 reads but the plan holds 24"):
        finish(run, store)
    assert dropped and sorted(p.name for p in Path(run.output).iterdir()) == ["_run"]


def test_threshold_flips_calls_exactly_at_the_threshold_and_never_the_published_files(tmp_path: Path) -> None:
    outputs = {}
    for name, threshold in (("default", None), ("at", "SCORE"), ("above", "NEXT")):
        if threshold == "SCORE":  # the 5th read's score, as reads.tsv prints it
            threshold = float(outputs["default"]["reads"][4]["max_p_virus"])
        elif threshold == "NEXT":  # the next float32 above it
            threshold = float(np.nextafter(np.float32(outputs["default"]["reads"][4]["max_p_virus"]), np.float32(1)))
        run, store = start(tmp_path / name, SAMPLES, shard_reads=5, group_reads=2, checkpoint_seconds=0.0, min_virus_score=threshold)
        marker, summary = finish(run, store)
        assert marker == SUCCESS and summary["min_virus_score"] == threshold
        out = Path(run.output)
        outputs[name] = {"reads": table(out / "reads.tsv"), **{f: (out / f).read_bytes() for f in PUBLISHED}}
    for name in ("at", "above"):
        assert all(outputs[name][f] == outputs["default"][f] for f in PUBLISHED)  # byte-identical
    score = np.float32(outputs["default"]["reads"][4]["max_p_virus"])
    assert outputs["at"]["reads"][4]["call"] == "virus" and outputs["above"]["reads"][4]["call"] == "others"
    for name in ("at", "above"):
        for row in outputs[name]["reads"]:
            if row["max_p_virus"] == "NA":
                assert row["call"] == "none"
                continue
            expected = np.float32(row["max_p_virus"]) >= (score if name == "at" else np.nextafter(score, np.float32(1)))
            assert row["call"] == ("virus" if expected else "others"), row
            assert row["virus_chunks"] == ("1" if expected else "0")
    # the default is the published rule: virus when P(virus) >= P(others) (the fake: P(others) = 1 - P(virus))
    for row in outputs["default"]["reads"]:
        if row["max_p_virus"] != "NA":
            virus = np.float32(row["max_p_virus"])
            assert row["call"] == ("virus" if virus >= np.float32(1) - virus else "others")


def test_viral_reads_are_exactly_the_reads_called_virus_whole_in_input_order(tmp_path: Path) -> None:
    run, store = start(tmp_path, SAMPLES, shard_reads=4, group_reads=2, checkpoint_seconds=0.0, write_viral_reads=True)
    marker, summary = finish(run, store)
    assert marker == SUCCESS and summary["files"]["viral_reads.fa.gz"]["bytes"] > 0
    reads = table(Path(run.output) / "reads.tsv")
    with dnaio.open(Path(run.output) / "viral_reads.fa.gz") as fasta:
        records = [(r.name, r.sequence) for r in fasta]
    letters = {}
    for name in SAMPLES:
        with dnaio.open(tmp_path / name) as fasta:
            letters.update({r.name: r.sequence for r in fasta})
    expected = [row for row in reads if row["call"] == "virus"]
    assert 0 < len(expected) < len(reads)
    assert [name.split(" ")[0] for name, _ in records] == [row["read_id"] for row in expected]
    assert [seq for _, seq in records] == [letters[row["read_id"]] for row in expected]  # whole reads
    for (name, _), row in zip(records, expected):
        assert name == f"{row['read_id']} max_p_virus={row['max_p_virus']} input={row['input']}"
    assert summary["virus_chunks"] == sum(int(row["virus_chunks"]) for row in reads)


def test_summary_counts_add_up_per_input_and_in_total_with_a_failed_shard(tmp_path: Path) -> None:
    run, store = start(tmp_path, SAMPLES, shard_reads=4, group_reads=2, checkpoint_seconds=0.0, max_attempts=1)
    marker, summary = finish(run, store, FakePredictor(2, poison={"a09"}))
    assert marker == FAILED
    out = Path(run.output)
    reads = table(out / "reads.tsv")
    assert [row["input"] for row in reads] == [str(tmp_path / "a.fa")] * 14 + [str(tmp_path / "b.fa")] * 10
    rows = {row["input"]: row for row in table(out / "summary.tsv")}
    assert list(rows) == [str(tmp_path / "a.fa"), str(tmp_path / "b.fa"), RUN_ROW]
    outcome_columns = [c for c in rows[RUN_ROW] if c in ("virus", "others") or c.startswith("none:")]
    assert "none:shard_failed" in outcome_columns and "none:empty" in outcome_columns
    for source in (str(tmp_path / "a.fa"), str(tmp_path / "b.fa")):
        mine = [row for row in reads if row["input"] == source]
        assert int(rows[source]["reads"]) == len(mine) == sum(int(rows[source][c]) for c in outcome_columns)
        assert int(rows[source]["frames"]) == sum(int(row["kept_frames"]) for row in mine)
        assert int(rows[source]["virus_chunks"]) == sum(int(row["virus_chunks"]) for row in mine)
        for column in outcome_columns:
            call, _, reason = column.partition(":")
            assert int(rows[source][column]) == sum(row["call"] == call and (not reason or row["reason"] == reason) for row in mine)
    for column in ["reads", "frames", "virus_chunks", *outcome_columns]:
        assert int(rows[RUN_ROW][column]) == int(rows[str(tmp_path / "a.fa")][column]) + int(rows[str(tmp_path / "b.fa")][column])
    assert int(rows[RUN_ROW]["reads"]) == summary["reads"] == 24
    assert int(rows[RUN_ROW]["none:shard_failed"]) == summary["reads_by_outcome"]["shard_failed"] > 0
    assert rows[str(tmp_path / "b.fa")]["share_shorter_than_chunk"] == "0.1000"  # the empty read
    report = (out / "report.html").read_text()
    assert "failed shards" in report and "shard(s) failed" in report and report.count("<svg") == 4


def test_an_input_with_no_reads_has_no_share_of_short_reads() -> None:
    from job.summary import RunStats

    stats = RunStats(["a.fa", "empty.fa"], 500)
    stats.add_row("r1\t150\t1\t0\tNA\tnone\tno_open_frame\t0\ta.fa\n")
    rows = {line.split("\t")[0]: line.split("\t") for line in stats.tsv().splitlines()}
    assert rows["empty.fa"][-2:] == ["NA", "NA"] and rows["a.fa"][-2:] == ["1.0000", "1.0000"]  # not 0: unknown


def finish_with_warnings(run: RunConfig, store: LocalStore, event: str) -> tuple[dict, str, list[dict]]:
    """Finish the run: (_SUCCESS, report.html's text, the `event` warnings logged)."""
    with structlog.testing.capture_logs() as logged:
        finish(run, store)
    success = json.loads((Path(run.output) / "_SUCCESS").read_text())
    report = (Path(run.output) / "report.html").read_text()
    return success, report, [e for e in logged if e["event"] == event and e["log_level"] == "warning"]


@pytest.mark.parametrize(("length", "warned"), [(150, True), (600, False)])
def test_short_reads_are_warned_about_with_the_fact_behind_it(tmp_path: Path, length: int, warned: bool) -> None:
    run, store = start(tmp_path, {"s.fa": [(f"s{i}", length) for i in range(6)]}, shard_reads=3, checkpoint_seconds=0.0)
    success, report, short = finish_with_warnings(run, store, "short_reads")
    assert ("short_reads_warning" in success) == bool(short) == ("0.53 accuracy" in report) == warned
    if warned:
        assert "0.53 accuracy" in success["short_reads_warning"] and "ROC-AUC 0.55-0.67" in short[0]["message"]
        assert "under 250 bp" in success["short_reads_warning"] and "s.fa (100% of 6 reads)" in success["short_reads_warning"]


@pytest.mark.parametrize(("names", "mate_ids", "warned"), [
    (("SRR1_1.fa", "SRR1_2.fa"), False, False),  # a pair by name: the mate comes from the file
    (("SRR1_1.fa", "SRR1_2.fa"), True, False),  # ids ending in /1 and /2 already
    (("lane1.fa", "lane2.fa"), False, True),  # no pair by name: R2's reads are duplicate_id
])
def test_both_mates_of_a_pair_without_mate_ids_are_scored_and_a_run_that_cannot_tell_them_warns(
    tmp_path: Path, names: tuple[str, str], mate_ids: bool, warned: bool,
) -> None:
    pair = {name: [(f"SRR1.{i}/{mate}" if mate_ids else f"SRR1.{i}", 600) for i in range(4)]
            for mate, name in enumerate(names, start=1)}
    run, store = start(tmp_path, pair, shard_reads=3, checkpoint_seconds=0.0)
    success, report, logged = finish_with_warnings(run, store, "duplicate_ids")
    assert ("duplicate_ids_warning" in success) == bool(logged) == ("ending in /1 and /2" in report) == warned
    reads = table(Path(run.output) / "reads.tsv")
    if warned:
        assert f"in {tmp_path / 'lane2.fa'} (100% of 4 reads):" in success["duplicate_ids_warning"]
        assert [row["reason"] for row in reads] == [""] * 4 + ["duplicate_id"] * 4
    else:
        assert [row["read_id"] for row in reads] == [f"SRR1.{i}/{mate}" for mate in (1, 2) for i in range(4)]
        assert all(row["reason"] == "" for row in reads)
        predicted = (Path(run.output) / "prediction_results.txt").read_text()
        assert "SRR1.0/2_chunk_1" in predicted and "SRR1.0/1_chunk_1" in predicted


def test_report_for_an_empty_input(tmp_path: Path) -> None:
    run, store = start(tmp_path, {"empty.fa": []}, gpu_hour_price=3.0)
    marker, summary = finish(run, store)
    report = (Path(run.output) / "report.html").read_text()
    assert marker == SUCCESS and summary["reads"] == 0
    assert report.count("<svg") == 4 and report.count("no reads") >= 3 and "no results committed" in report
    assert "per GPU-hour = 0.00" in report and "no reads" in report
    assert (Path(run.output) / "summary.tsv").read_text().splitlines()[1:] == [
        f"{tmp_path / 'empty.fa'}\t0\t0\t0\t0\t0\tNA\tNA", f"{RUN_ROW}\t0\t0\t0\t0\t0\tNA\tNA",
    ]


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


def test_threshold_run_end_to_end_published_files_identical_and_resume_with_another_refused(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 40, seed=4)
    plain = run_cli(run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "plain")))
    assert plain.returncode == 0, plain.stderr
    scored = [row for row in table(tmp_path / "plain" / "reads.tsv") if row["max_p_virus"] != "NA"]
    threshold = sorted(row["max_p_virus"] for row in scored)[len(scored) // 2]
    extra = ("--min-virus-score", threshold, "--write-viral-reads", "--gpu-hour-price", "1.5")
    strict = run_cli(run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "strict"), *extra))
    assert strict.returncode == 0, strict.stderr
    for name in PUBLISHED:
        assert read_output(str(tmp_path / "strict"), name) == read_output(str(tmp_path / "plain"), name)
    rows = table(tmp_path / "strict" / "reads.tsv")
    assert {row["call"] for row in rows if row["max_p_virus"] != "NA" and np.float32(row["max_p_virus"]) >= np.float32(threshold)} == {"virus"}
    assert {row["call"] for row in rows if row["max_p_virus"] != "NA" and np.float32(row["max_p_virus"]) < np.float32(threshold)} == {"others"}
    with gzip.open(tmp_path / "strict" / "viral_reads.fa.gz", "rt") as fasta:
        assert [line[1:].split(" ")[0] for line in fasta if line.startswith(">")] == [r["read_id"] for r in rows if r["call"] == "virus"]
    assert "per GPU-hour" in (tmp_path / "strict" / "report.html").read_text()
    again = run_cli(run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "strict"), "--min-virus-score", "0.9"))
    assert again.returncode == 65 and f"--min-virus-score differs from the run at {tmp_path / 'strict'}" in again.stderr


def test_a_damaged_run_stops_in_one_line_with_exit_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The merge's count check (and a committed part gone) raised RuntimeError: a traceback."""
    import job.batch

    def damaged(self: object) -> int:
        raise RunDamaged("the merge listed 23 reads but the plan holds 24: no output is written")

    monkeypatch.setattr(job.batch._BatchRun, "run", damaged)
    config = RunConfig(inputs=("in.fa",), output=str(tmp_path / "out"), esm_model="-", dnabert_model="-",
                       classifier="-", imds_url="http://127.0.0.1:9", log_format="json")
    assert job.batch.run_batch(config) == exit_codes.INTERNAL_ERROR
    err = capsys.readouterr().err
    assert "virnucpro: error: the merge listed 23 reads" in err and "Traceback" not in err
