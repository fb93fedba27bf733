"""The batch job under fire: kills at random moments, a zombie worker, racing starters,
clocks 10 leases apart, S3 faults and a spot notice. Every run ends with outputs
byte-identical to an uninterrupted run, and every input read exactly once in reads.tsv.
30% of the reads repeat earlier ones, so embeddings are reused within and across groups, and
across the resume points (core/pipeline.py).

Shards of 25 reads are committed group by group (6 reads, --checkpoint-seconds 0), so a
kill often lands inside a shard and its resume restarts it mid-way."""
from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import boto3
import pytest

from job.plan import load_plan
from job.shards import read_shard
from job.store import open_store
from job_support import (  # noqa: F401 (fixtures)
    FINAL_FILES, LOOPBACK_ONLY, FakeIMDS, FaultProxy, JobProcess, bucket, read_output, run_args, s3_endpoint,
    subprocess_env, write_reads,
)

pytestmark = pytest.mark.slow
READS = 200
KILL_MOMENTS = ("start", "run_planned", "shard_claimed", "part_committed", "merge_started", "output_written")
KILL_AFTER_EVENTS = {"shard_claimed": 6, "part_committed": 12, "output_written": 3}  # kill after the n-th


@pytest.fixture(scope="module")
def reads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("chaos") / "reads.fa"
    return path, write_reads(path, READS, seed=11, repeats=0.3)  # reused embeddings, across resumes too


@pytest.fixture(scope="module")
def baseline(demo_models: Path, reads: tuple[Path, list[str]], s3_endpoint: str) -> dict[str, bytes]:  # noqa: F811
    """The outputs of an uninterrupted run."""
    name = "baseline-outputs"
    boto3.client("s3").create_bucket(Bucket=name)
    job = JobProcess(args(demo_models, reads, f"s3://{name}/run"), subprocess_env())
    assert job.wait() == 0, job.log_text
    outputs = {file: read_output(f"s3://{name}/run", file) for file in FINAL_FILES}
    ids = [line.split(b"\t")[0].decode() for line in outputs["reads.tsv"].splitlines()[1:]]
    assert ids == reads[1]
    return outputs


def args(models: Path, reads: tuple[Path, list[str]], output: str, *extra: str) -> list[str]:
    return run_args(models, [str(reads[0])], output, "--shard-reads", "25", "--checkpoint-seconds", "0", *extra)


RESUMED_MID_SHARD: list[int] = []  # per kill trial: shards whose parts two attempts committed


def resumed_mid_shard(output: str) -> int:
    store = open_store(output)
    states = [read_shard(store, shard.index)[0] for shard in load_plan(store).shards]
    return sum(len({part.rows.rsplit("-a", 1)[1].split("-")[0] for part in state.parts}) > 1 for state in states)


def assert_same_outputs(output: str, baseline: dict[str, bytes]) -> None:
    for file in FINAL_FILES:
        assert read_output(output, file) == baseline[file], f"{output}/{file} differs from the uninterrupted run"
    assert json.loads(read_output(output, "_SUCCESS"))["reads"] == READS


def finish(models: Path, reads: tuple[Path, list[str]], output: str, env: dict[str, str] | None = None) -> int:
    """Rerun the same command until the run is finished; returns how many reruns it took."""
    for rerun in range(1, 4):
        job = JobProcess(args(models, reads, output), env or subprocess_env())
        code = job.wait()
        if code == 0:
            return rerun
        assert code in (75, 1), job.log_text
    raise AssertionError(f"{output} did not finish after 3 reruns")


def wait_gone(pids: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} outlived their job"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


@pytest.mark.parametrize("seed", range(20))
def test_killed_at_a_random_moment_then_rerun(
    seed: int, demo_models: Path, reads: tuple[Path, list[str]], baseline: dict[str, bytes], bucket: str,  # noqa: F811
) -> None:
    rng = random.Random(seed)
    moment = KILL_MOMENTS[seed % len(KILL_MOMENTS)]
    target = rng.choice(["parent", "worker"])
    signum = rng.choice([signal.SIGTERM, signal.SIGKILL])
    output = f"s3://{bucket}/trial"
    job = JobProcess(args(demo_models, reads, output), subprocess_env())
    if moment == "start":
        time.sleep(rng.uniform(0.2, 4.0))
    else:
        job.wait_for(moment, count=rng.randint(1, KILL_AFTER_EVENTS.get(moment, 1)))
        time.sleep(rng.uniform(0, 0.3))
    workers = job.worker_pids()
    victim = rng.choice(workers) if target == "worker" and workers else job.process.pid
    try:
        os.kill(victim, signum)
    except ProcessLookupError:
        pass  # it had just finished
    code = job.wait()
    wait_gone(workers)
    print(f"seed {seed}: {signum.name} {'parent' if victim == job.process.pid else 'worker'} at {moment}: exit {code}")
    if code != 0:
        finish(demo_models, reads, output)
    assert_same_outputs(output, baseline)
    RESUMED_MID_SHARD.append(resumed_mid_shard(output))


def test_kills_landed_inside_shards() -> None:
    """The trials above exercised resumes from the middle of a shard, not only whole shards."""
    if len(RESUMED_MID_SHARD) < 20:
        pytest.skip("runs after the 20 kill trials")
    assert sum(count > 0 for count in RESUMED_MID_SHARD) >= 3, RESUMED_MID_SHARD


SKEWED_CLOCKS = """
import os
import time

_offset = float(os.environ["VIRNUCPRO_TEST_CLOCK_OFFSET"])
_time, _monotonic = time.time, time.monotonic
time.time = lambda: _time() + _offset
time.monotonic = lambda: _monotonic() + _offset

import runpy  # this module shadows the loopback guard's sitecustomize: run that too

runpy.run_path(os.environ["VIRNUCPRO_TEST_GUARD"])
"""


def test_clocks_ten_leases_apart_change_nothing(
    demo_models: Path, reads: tuple[Path, list[str]], baseline: dict[str, bytes], bucket: str, tmp_path: Path,  # noqa: F811
) -> None:
    """Two machines whose clocks are 30 s apart each way (10x the 3 s lease), wall and
    monotonic, share one run: no lease is taken from a live holder, nothing fails, and the
    outputs are those of an uninterrupted run. (The time source is replaced in every process
    by a sitecustomize module, the system clock is untouched.)"""
    (tmp_path / "sitecustomize.py").write_text(SKEWED_CLOCKS)
    output = f"s3://{bucket}/skew"
    jobs = []
    for offset in ("30", "-30"):
        env = subprocess_env()
        env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
        env["VIRNUCPRO_TEST_CLOCK_OFFSET"] = offset
        env["VIRNUCPRO_TEST_GUARD"] = str(LOOPBACK_ONLY / "sitecustomize.py")
        jobs.append(JobProcess(args(demo_models, reads, output, "--workers", "1"), env))
    assert [job.wait() for job in jobs] == [0, 0], [job.log_text for job in jobs]
    assert_same_outputs(output, baseline)
    store = open_store(output)
    states = [read_shard(store, shard.index)[0] for shard in load_plan(store).shards]
    assert all(state.done and state.lost == 0 and state.errors == () for state in states), states
    workers = {e["worker"] for job in jobs for e in job.events if e["event"] == "shard_done"}
    assert len(workers) == 2  # both machines worked

def test_zombie_worker_cannot_commit(
    demo_models: Path, reads: tuple[Path, list[str]], baseline: dict[str, bytes], bucket: str,  # noqa: F811
) -> None:
    output = f"s3://{bucket}/zombie"
    job = JobProcess(args(demo_models, reads, output, "--checkpoint-seconds", "0"), subprocess_env())
    claimed = job.wait_for("part_committed")  # a part per group: the shard is not done yet
    assert claimed is not None and claimed["committed"] < claimed["shard_reads"]
    zombie_pid = int(claimed["worker"].split("-")[-2])
    shard = claimed["shard"]
    os.kill(zombie_pid, signal.SIGSTOP)
    try:
        store = open_store(output)
        deadline = time.monotonic() + 90
        while read_shard(store, shard)[0].attempt < 2:  # its lease expires, the other worker takes over
            assert time.monotonic() < deadline, "nobody took the stopped worker's shard over"
            time.sleep(0.2)
    finally:
        os.kill(zombie_pid, signal.SIGCONT)
    assert job.wait() == 0, job.log_text
    assert_same_outputs(output, baseline)
    zombie = [e for e in job.events if e.get("worker") == claimed["worker"]]
    assert any(e["event"] == "lease_lost" and e["shard"] == shard for e in zombie), "the zombie did not notice"
    state, _ = read_shard(store, shard)
    assert state.done and state.lost == 1 and state.reads_done == 25


def test_three_starters_share_one_plan(
    demo_models: Path, reads: tuple[Path, list[str]], baseline: dict[str, bytes], bucket: str,  # noqa: F811
) -> None:
    output = f"s3://{bucket}/together"
    jobs = [
        JobProcess(args(demo_models, reads, output, "--workers", "1", "--lease-seconds", "20"), subprocess_env())
        for _ in range(3)
    ]
    assert [job.wait() for job in jobs] == [0, 0, 0], [job.log_text for job in jobs]
    assert_same_outputs(output, baseline)
    run_ids = {e["run_id"] for job in jobs for e in job.events if e["event"] == "run_planned"}
    assert len(run_ids) == 1
    store = open_store(output)
    plan = load_plan(store)
    states = [read_shard(store, shard.index)[0] for shard in plan.shards]
    assert all(state.done and state.attempt == 1 for state in states), "a shard was processed twice"
    assert sum(e["event"] == "merge_started" for job in jobs for e in job.events) == 1
    workers = {e["worker"] for job in jobs for e in job.events if e["event"] == "shard_done"}
    assert len(workers) >= 2  # the work was shared


def test_s3_faults_do_not_change_the_outputs(
    demo_models: Path, reads: tuple[Path, list[str]], baseline: dict[str, bytes], bucket: str, s3_endpoint: str,  # noqa: F811
) -> None:
    proxy = FaultProxy(s3_endpoint, fault_rate=0.2, seed=5)
    output = f"s3://{bucket}/faults"
    try:
        job = JobProcess(args(demo_models, reads, output), subprocess_env(proxy.url))
        assert job.wait() == 0, job.log_text
    finally:
        proxy.close()
    assert proxy.faults > 20, proxy.faults
    assert_same_outputs(output, baseline)


def test_spot_notice_stops_the_run_which_then_resumes(
    demo_models: Path, bucket: str, tmp_path: Path,  # noqa: F811
) -> None:
    # Two shards of 3,000 reads, one per worker: at the ~200 reads/s of one CPU worker each
    # lasts ~15 s, three times the 5 s the poll may take to see the notice, so the stop lands
    # inside them. (Shards of 100 reads were sometimes finished by the very group the stop
    # committed: nothing was left to release, and the resume had nothing to resume.)
    count, shard_reads = 6000, 3000
    ids = write_reads(tmp_path / "many.fa", count, seed=12)
    command = run_args(demo_models, [str(tmp_path / "many.fa")], f"s3://{bucket}/spot", "--shard-reads", str(shard_reads))
    imds = FakeIMDS()
    try:
        job = JobProcess(command + ["--imds-url", imds.url], subprocess_env())
        assert job.wait_for("part_committed") is not None
        imds.notice()
        noticed = time.monotonic()
        assert job.wait() == 75, job.log_text
        assert time.monotonic() - noticed < 5 + 10 + 5  # poll interval + grace + margin
    finally:
        imds.close()
    assert any(e["event"] == "spot_interruption_notice" for e in job.events), job.log_text
    # Each worker that claimed a shard gave it back unfinished (the other may still have been
    # loading its models when the notice came: it never claimed one).
    released = [e["shard"] for e in job.events if e["event"] == "shard_released"]
    claimed = {e["shard"] for e in job.events if e["event"] == "shard_claimed"}
    assert released and sorted(released) == sorted(claimed), job.log_text
    store = open_store(f"s3://{bucket}/spot")
    states = [read_shard(store, shard.index)[0] for shard in load_plan(store).shards]
    assert not any(state.owner for state in states), "a stopped worker kept its lease"
    assert not any(state.done for state in states)
    resumable = sum(1 for state in states if state.attempt)  # the released ones: each claimed again once
    resumed = JobProcess(command, subprocess_env())
    assert resumed.wait() == 0, resumed.log_text
    reads = read_output(f"s3://{bucket}/spot", "reads.tsv").decode().splitlines()[1:]
    assert [line.split("\t")[0] for line in reads] == ids
    summary = json.loads(read_output(f"s3://{bucket}/spot", "_SUCCESS"))
    assert summary["interruptions"] == resumable and summary["reads"] == count
