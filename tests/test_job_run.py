"""`virnucpro run` end to end, as subprocesses with demo models: local and S3 (moto) runs."""
from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
from pathlib import Path

import boto3
import h5py
import numpy as np

from job_support import (
    FINAL_FILES, JobProcess, bucket, read_output, run_args, s3_endpoint, same_reads, subprocess_env, virnucpro, write_reads,  # noqa: F401
)


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


def logs(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_local_run_finishes_reports_and_resumes(demo_models: Path, tmp_path: Path) -> None:
    ids = write_reads(tmp_path / "in.fa", 70, seed=1)
    out = tmp_path / "out"
    first = run(run_args(demo_models, [str(tmp_path / "in.fa")], str(out)))
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["reads"] == 70 and summary["shards"] == 3 and summary["demo_models"] is True
    assert "meaningless" in summary["warning"]
    assert summary["reads_by_outcome"]["duplicate_id"] == 1 and summary["reads_by_outcome"]["empty"] == 1
    reads = (out / "reads.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in reads[1:]] == ids
    predictions = (out / "prediction_results.txt").read_text().splitlines()
    assert predictions[0] == "Sequence_ID\tPrediction\tscore1\tscore2" and len(predictions) - 1 == summary["frames"]
    events = logs(first.stderr)
    assert all("run_id" in e for e in events if e["event"] in ("part_committed", "shard_claimed", "run_finished"))
    assert all({"shard", "attempt", "worker"} <= e.keys() for e in events if e["event"] == "part_committed")
    assert "testing" not in first.stderr  # the test credentials never reach the logs

    before = {name: (out / name).stat().st_mtime_ns for name in FINAL_FILES}
    again = run(run_args(demo_models, [str(tmp_path / "in.fa")], str(out)))
    assert again.returncode == 0 and json.loads(again.stdout) == summary
    assert {name: (out / name).stat().st_mtime_ns for name in FINAL_FILES} == before

    status = run(virnucpro("status", "--output", str(out)))
    assert status.returncode == 0 and "_SUCCESS; shards 3 done, 0 leased, 0 pending, 0 failed of 3" in status.stdout


def test_s3_inputs_models_and_output_match_a_local_run(demo_models: Path, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    local_in = tmp_path / "in"
    local_in.mkdir()
    write_reads(tmp_path / "a.fa", 40, seed=2)
    (local_in / "a.fa.gz").write_bytes(gzip.compress((tmp_path / "a.fa").read_bytes()))
    write_reads(local_in / "b.fasta", 25, seed=3)
    s3 = boto3.client("s3")
    for path in local_in.iterdir():
        s3.upload_file(str(path), bucket, f"reads/{path.name}")
    for path in demo_models.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"models/{path.relative_to(demo_models).as_posix()}")
    remote_models = [
        "--esm-model", f"s3://{bucket}/models/esm2_demo.pt",
        "--dnabert-model", f"s3://{bucket}/models/dnabert_demo",
        "--classifier", f"s3://{bucket}/models/classifier_500.pth",
    ]
    output = f"s3://{bucket}/runs/one"
    remote = run(
        run_args(demo_models, [f"s3://{bucket}/reads/"], output, "--write-features", *remote_models, cache=tmp_path / "cache")
    )
    assert remote.returncode == 0, remote.stderr
    local = run(run_args(demo_models, [str(local_in)], str(tmp_path / "out"), "--write-features"))
    assert local.returncode == 0, local.stderr
    remote_summary, local_summary = json.loads(remote.stdout), json.loads(local.stdout)
    assert remote_summary["models"] == local_summary["models"]  # same checksums, downloaded or not
    for name in (*FINAL_FILES, "features.h5", "summary.tsv"):
        remote_file, local_file = read_output(output, name), (tmp_path / "out" / name).read_bytes()
        if name == "summary.tsv":  # its rows name the inputs: compare the counts
            remote_file, local_file = (b"".join(line.split(b"\t", 1)[1] for line in f.splitlines(True)) for f in (remote_file, local_file))
        assert same_reads(name, remote_file) == same_reads(name, local_file), name
    published = ("prediction_results.txt", "prediction_results_highestscore.csv", "features.h5")
    assert {name: remote_summary["files"][name] for name in published} == {name: local_summary["files"][name] for name in published}
    with h5py.File(tmp_path / "out" / "features.h5") as h5:
        frame_ids = [f.decode() for f in h5["frame_ids"][:]]
        assert h5["features"].dtype == np.float32 and h5["features"].shape == (len(frame_ids), 128)
    predictions = (tmp_path / "out" / "prediction_results.txt").read_text().splitlines()[1:]
    assert frame_ids == [line.split("\t")[0] for line in predictions]
    leftovers = s3.list_objects_v2(Bucket=bucket, Prefix="runs/one/_run/parts/").get("KeyCount", 0)
    assert leftovers == 0
    cached = list((tmp_path / "cache").glob("*/manifest.json"))
    assert len(cached) == 3


def test_numbers_out_of_range_are_a_bad_command_line(demo_models: Path, tmp_path: Path) -> None:
    for flag, value, message in (
        ("--min-virus-score", "1.5", "--min-virus-score is a probability, from 0 to 1, not 1.5"),
        ("--min-virus-score", "nan", "--min-virus-score is a probability, from 0 to 1, not nan"),
        ("--gpu-hour-price", "-3", "--gpu-hour-price must be at least 0, not -3.0"),
        ("--shard-reads", "0", "--shard-reads must be at least 1, not 0"),
    ):
        out = run(run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "out"), flag, value))
        assert out.returncode == 2 and out.stderr.rstrip().endswith(f"virnucpro run: error: {message}"), out.stderr
    assert not (tmp_path / "out").exists()


def test_bad_inputs_and_outputs_are_refused_clearly(demo_models: Path, bucket: str, tmp_path: Path) -> None:  # noqa: F811
    missing = run(run_args(demo_models, [str(tmp_path / "nope.fa")], str(tmp_path / "o1")))
    assert missing.returncode == 65 and f"input {tmp_path / 'nope.fa'} does not exist" in missing.stderr
    missing_s3 = run(run_args(demo_models, [f"s3://{bucket}/nope.fa"], str(tmp_path / "o2")))
    assert missing_s3.returncode == 65 and f"input s3://{bucket}/nope.fa does not exist" in missing_s3.stderr

    write_reads(tmp_path / "in.fa", 10, seed=4)
    (tmp_path / "a-file").write_text("")
    blocked = run(run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "a-file" / "out")))
    assert blocked.returncode == 65 and f"cannot write to output {tmp_path / 'a-file' / 'out'}" in blocked.stderr
    no_bucket = run(run_args(demo_models, [str(tmp_path / "in.fa")], "s3://no-such-bucket-here/out"))
    assert no_bucket.returncode == 65 and "cannot write to output s3://no-such-bucket-here/out" in no_bucket.stderr
    malformed = tmp_path / "bad.fa"
    malformed.write_text("ACGT\n>r1\nACGT\n")
    bad = run(run_args(demo_models, [str(malformed)], str(tmp_path / "o3")))
    assert bad.returncode == 65 and f"{malformed}, line 1" in bad.stderr


def test_empty_input_gives_header_only_outputs(demo_models: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.fa").write_text("")
    done = run(run_args(demo_models, [str(tmp_path / "empty.fa")], str(tmp_path / "out"), "--write-features"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert summary["reads"] == 0 and summary["frames"] == 0 and summary["shards"] == 0
    assert summary["empty_inputs"] == [str(tmp_path / "empty.fa")] and summary["empty_inputs_warning"] == (
        f"{tmp_path / 'empty.fa'} holds no reads: check that the right files were given")
    assert any(e["event"] == "empty_input" and e["input"] == str(tmp_path / "empty.fa") for e in logs(done.stderr))
    assert (tmp_path / "out" / "reads.tsv").read_text().count("\n") == 1
    assert (tmp_path / "out" / "prediction_results.txt").read_text() == "Sequence_ID\tPrediction\tscore1\tscore2\n"
    with h5py.File(tmp_path / "out" / "features.h5") as h5:
        assert h5["features"].shape == (0, 128)


def test_interrupted_run_refuses_changed_input_and_arguments(demo_models: Path, tmp_path: Path) -> None:
    fasta = tmp_path / "in.fa"
    write_reads(fasta, 60, seed=5)
    args = run_args(demo_models, [str(fasta)], str(tmp_path / "out"))
    job = JobProcess(args, subprocess_env())
    assert job.wait_for("run_planned") is not None
    job.process.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 75, job.log_text
    changed_args = run(args + ["--write-features"])
    assert changed_args.returncode == 65 and "--write-features differs from the run at" in changed_args.stderr
    shutil.copy(fasta, tmp_path / "copy.fa")
    write_reads(fasta, 61, seed=5)
    changed = run(args)
    assert changed.returncode == 65 and f"input {fasta} changed since the run at" in changed.stderr
