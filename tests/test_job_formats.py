"""`virnucpro run` end to end on real-world inputs: FASTQ(.gz, multi-member, BGZF), paired-end
mates, and an S3 input overwritten while the run works on it."""
from __future__ import annotations

import gzip
import json
import random
import subprocess
from pathlib import Path

import boto3
import pytest

from job_support import (  # noqa: F401 (fixtures)
    FINAL_FILES, JobProcess, bucket, read_output, run_args, s3_endpoint, same_reads, subprocess_env, write_reads,
)
from test_job_datapath import bgzf, multi_member


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


def fasta_to_fastq(fasta: bytes) -> bytes:
    """The same reads as FASTQ: one sequence line, a quality of the same length."""
    out, header, sequence = [], None, []
    for line in fasta.decode().splitlines() + [">"]:
        if line.startswith(">"):
            if header is not None:
                joined = "".join(sequence)
                out.append(f"@{header}\n{joined}\n+\n{'I' * len(joined)}\n")
            header, sequence = line[1:], []
        else:
            sequence.append(line)
    return "".join(out).encode()


@pytest.fixture(scope="module")
def fasta_run(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    tmp = tmp_path_factory.mktemp("fasta")
    write_reads(tmp / "in.fa", 75, seed=11)
    done = run(run_args(demo_models, [str(tmp / "in.fa")], str(tmp / "out")))
    assert done.returncode == 0, done.stderr
    return tmp / "in.fa", {name: (tmp / "out" / name).read_bytes() for name in FINAL_FILES}


@pytest.mark.parametrize("form", ["fastq", "fastq.gz", "fastq-multi-member.gz", "fastq-bgzf.gz", "fa.gz"])
def test_fastq_and_gzip_forms_give_the_outputs_of_the_same_reads_in_fasta(
    demo_models: Path, tmp_path: Path, fasta_run: tuple[Path, dict[str, bytes]], form: str,
) -> None:
    fasta, expected = fasta_run
    text = fasta.read_bytes() if form == "fa.gz" else fasta_to_fastq(fasta.read_bytes())
    packed = {
        "fastq": text, "fastq.gz": gzip.compress(text), "fastq-multi-member.gz": multi_member(text, 5),
        "fastq-bgzf.gz": bgzf(text), "fa.gz": gzip.compress(text),
    }[form]
    path = tmp_path / f"in.{form}"
    path.write_bytes(packed)
    done = run(run_args(demo_models, [str(path)], str(tmp_path / "out")))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reads"] == 75 and json.loads(done.stdout)["shards"] == 3
    for name in FINAL_FILES:
        assert same_reads(name, (tmp_path / "out" / name).read_bytes()) == same_reads(name, expected[name]), name
    assert not list((tmp_path / "out" / "_run").glob("inputs/*"))  # the shard copies are gone after _SUCCESS


def test_paired_end_files_with_casava_headers_score_both_mates(demo_models: Path, tmp_path: Path) -> None:
    rng = random.Random(12)
    mates: dict[int, list[str]] = {1: [], 2: []}
    names = [f"M00123:7:000000000-A1B2C:1:1101:{1000 + n}:{2000 + n}" for n in range(20)]
    for name in names:
        for mate in (1, 2):
            sequence = "".join(rng.choice("ACGT") for _ in range(rng.choice([120, 300, 520])))
            mates[mate].append(f"@{name} {mate}:N:0:ACGTAC\n{sequence}\n+\n{'F' * len(sequence)}\n")
    mates[2].append(mates[2][4])  # a true duplicate: same name, same mate
    for mate in (1, 2):
        (tmp_path / f"s_R{mate}.fastq.gz").write_bytes(gzip.compress("".join(mates[mate]).encode()))
    inputs = [str(tmp_path / "s_R1.fastq.gz"), str(tmp_path / "s_R2.fastq.gz")]
    done = run(run_args(demo_models, inputs, str(tmp_path / "out")))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["reads"] == 41 and summary["reads_by_outcome"]["duplicate_id"] == 1
    rows = [line.split("\t") for line in (tmp_path / "out" / "reads.tsv").read_text().splitlines()[1:]]
    ids = [row[0] for row in rows]
    assert ids == [f"{n}/1" for n in names] + [f"{n}/2" for n in names] + [f"{names[4]}/2"]  # one row per read
    scored = [row for row in rows[:-1] if row[6] != "duplicate_id"]
    assert len(scored) == 40 and rows[-1][6] == "duplicate_id"
    predicted = {line.split("\t")[0].rsplit("_chunk_", 1)[0] for line in
                 (tmp_path / "out" / "prediction_results.txt").read_text().splitlines()[1:]}
    assert {n + "/1" for n in names} & predicted and {n + "/2" for n in names} & predicted  # both mates scored


def test_an_s3_input_overwritten_mid_run_stops_the_machine_already_working(
    demo_models: Path, bucket: str, s3_endpoint: str, tmp_path: Path,  # noqa: F811
) -> None:
    write_reads(tmp_path / "in.fa", 150, seed=13)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="in/reads.fa", Body=(tmp_path / "in.fa").read_bytes())
    out = f"s3://{bucket}/out"
    args = run_args(demo_models, [f"s3://{bucket}/in/reads.fa"], out, "--workers", "1")
    job = JobProcess(args, subprocess_env(s3_endpoint))
    assert job.wait_for("part_committed", timeout=240) is not None, job.log_text
    write_reads(tmp_path / "other.fa", 150, seed=14)
    s3.put_object(Bucket=bucket, Key="in/reads.fa", Body=(tmp_path / "other.fa").read_bytes())
    assert job.wait(timeout=240) == 65, job.log_text
    assert f"input s3://{bucket}/in/reads.fa changed while the run was using it" in job.log_text
    assert read_output(out, "_SUCCESS") is None and read_output(out, "reads.tsv") is None


def test_malformed_fastq_found_by_the_plan_pass_stops_the_run_with_the_readers_message(
    demo_models: Path, tmp_path: Path,
) -> None:
    write_reads(tmp_path / "in.fa", 120, seed=15)
    records = fasta_to_fastq((tmp_path / "in.fa").read_bytes()).decode().split("@read")[1:]
    records[100] = records[100].rsplit("\n", 2)[0] + "\nII\n"  # quality shorter than the sequence
    path = tmp_path / "bad.fastq.gz"
    path.write_bytes(gzip.compress(("@read" + "@read".join(records)).encode()))
    done = run(run_args(demo_models, [str(path)], str(tmp_path / "out")))
    assert done.returncode == 65, done.stderr
    assert f"virnucpro: error: {path}, line {4 * 100 + 4}" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "reads.tsv").exists()
