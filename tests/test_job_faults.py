"""Fault cases of issue 12: refusals before work, stops on time, kills, full disks, leftovers.

Each test fails when its defect returns. Subprocess runs use demo models on the CPU and a
local --output unless S3 matters; nothing goes beyond 127.0.0.1.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from core.errors import ModelLoadError, without_unsafe_advice
from job import exit_codes
from job.errors import disk_error_code, disk_error_message
from job.lease import ExpiryObserver
from job.merge import SUCCESS, MergeClaim, MergeInputs, merge
from job.plan import load_plan, shard_records
from job.shards import claim, read_shard
from job.store import LocalStore
from job_support import FINAL_FILES, REPO, JobProcess, run_args, s3_endpoint, subprocess_env, virnucpro, write_reads  # noqa: F401 (fixture)
from test_job_lease import FakeClock
from test_job_worker import DIM, FakePredictor, make_run, work

pytestmark = pytest.mark.slow


def run(args: list[str], timeout: float = 240, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=timeout, **kwargs)


def one_line_error(stderr: str) -> str:
    """The `virnucpro: error:` line, checked to be the only non-JSON output (no traceback)."""
    plain = [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("virnucpro: error: "), stderr
    assert "Traceback" not in stderr
    return plain[0]


def shard_states(output: str) -> list:
    store = LocalStore(output)
    return [read_shard(store, shard.index)[0] for shard in load_plan(store).shards]


def no_temporary_files(output: Path) -> None:
    leftovers = [str(p) for p in output.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not list(output.glob("_run/parts/**/*.*")), "parts left behind after _SUCCESS"


# --- item 5, 9, 11: models refused before the plan, in one line --------------------------------


def bad_tokenizer_model(demo_models: Path, target: Path) -> Path:
    """The demo DNABERT-S with a tokenizer whose id for 'A' lies past the model's vocabulary."""
    shutil.copytree(demo_models / "dnabert_demo", target)
    tokenizer = json.loads((target / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["A"] = 300  # the config's vocab_size is 256
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target


def test_a_model_that_cannot_work_is_refused_before_the_plan(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 20, seed=1)
    out = tmp_path / "out"
    bad = bad_tokenizer_model(demo_models, tmp_path / "dnabert_bad")
    args = run_args(demo_models, [str(tmp_path / "in.fa")], str(out), "--workers", "1")
    refused = run([*args, "--dnabert-model", str(bad)])
    assert refused.returncode == 65, refused.stderr
    line = one_line_error(refused.stderr)
    assert "token ids up to 300" in line and "vocab_size" in line and "tokenizer.json" in line
    assert not (out / "_run" / "plan.json").exists(), "the run was tied to the bad model"
    fixed = run(args)  # the corrected model is not refused
    assert fixed.returncode == 0, fixed.stderr


def test_a_classifier_of_the_wrong_width_is_refused_before_the_plan(demo_models: Path, tmp_path: Path) -> None:
    from core.classifier import write_demo_classifier

    write_reads(tmp_path / "in.fa", 5, seed=1)
    write_demo_classifier(tmp_path / "c_500.pth", tmp_path / "c_500.safetensors", input_dim=100, hidden_dim=8, chunk_length=500)
    out = tmp_path / "out"
    refused = run([*run_args(demo_models, [str(tmp_path / "in.fa")], str(out)), "--classifier", str(tmp_path / "c_500.pth")])
    assert refused.returncode == 65 and "expects 100 features" in one_line_error(refused.stderr)
    assert not (out / "_run" / "plan.json").exists()


def test_missing_model_files_say_they_do_not_exist(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 5, seed=1)
    base = run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "out"))
    missing = tmp_path / "nowhere" / "model_500.pth"
    no_classifier = run([*base, "--classifier", str(missing)])
    assert no_classifier.returncode == 65
    assert one_line_error(no_classifier.stderr) == f"virnucpro: error: classifier {missing} does not exist; check the path"
    no_esm = run([*base, "--esm-model", str(tmp_path / "esm.pt")])
    assert no_esm.returncode == 65 and "no such file" in one_line_error(no_esm.stderr)


def test_torch_advice_to_load_unsafely_is_never_passed_on(demo_models: Path, tmp_path: Path) -> None:
    from core.dnabert import load_dnabert

    model = tmp_path / "dnabert"
    shutil.copytree(demo_models / "dnabert_demo", model)
    torch.save({"embeddings.word_embeddings.weight": Fraction(1, 3)}, model / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as refused:
        load_dnabert(str(model), torch.device("cpu"))
    message = str(refused.value)
    assert "fractions.Fraction" in message and "refused" in message
    assert "weights_only" not in message and "safe_globals" not in message and "trust" not in message
    assert without_unsafe_advice("plain message") == "plain message"
    refused_run = run(run_args(demo_models, [str(tmp_path / "x.fa")], str(tmp_path / "out"), "--dnabert-model", str(model)))
    assert refused_run.returncode == 65 and "weights_only" not in refused_run.stderr


def test_a_finished_run_refuses_other_inputs_and_models(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 12, seed=2)
    out = str(tmp_path / "out")
    args = run_args(demo_models, [str(tmp_path / "in.fa")], out, "--workers", "1")
    assert run(args).returncode == 0
    write_reads(tmp_path / "other.fa", 12, seed=3)
    other = run(run_args(demo_models, [str(tmp_path / "other.fa")], out, "--workers", "1"))
    assert other.returncode == 65 and "is missing now" in one_line_error(other.stderr)
    bad = bad_tokenizer_model(demo_models, tmp_path / "dnabert_bad")
    other_model = run([*args, "--dnabert-model", str(bad)])
    assert other_model.returncode == 65, other_model.stderr
    before = {str(p): p.stat().st_mtime_ns for p in Path(out).rglob("*")}
    again = run(args)
    assert again.returncode == 0 and json.loads(again.stdout)["reads"] == 12
    assert {str(p): p.stat().st_mtime_ns for p in Path(out).rglob("*")} == before  # nothing written after the marker


def old_release_plan(inputs: list[Path]) -> bytes:
    """`_run/plan.json` as the release before the streaming plan wrote it (65e0e01 job/plan.py
    Plan.to_json): header fields and every shard in one object, segments [input, start, count, offset]."""
    fingerprints = [{"uri": str(p), "size": p.stat().st_size, "version": "old"} for p in inputs]
    shards = [{"index": 0, "reads": 12, "segments": [[0, 0, 12, 0]], "duplicates": [5]}]
    body = {"run_id": "0123456789ab", "created_at": 1.0e9, "inputs": fingerprints,
            "settings": {"chunk_length": 500, "write_features": False}, "shard_reads": 20000, "shards": shards}
    return json.dumps(body, separators=(",", ":")).encode()


def test_a_run_planned_by_the_previous_release_is_refused_in_one_line(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 12, seed=2)
    out = tmp_path / "out"
    (out / "_run" / "shards").mkdir(parents=True)
    (out / "_run" / "plan.json").write_bytes(old_release_plan([tmp_path / "in.fa"]))
    (out / "_run" / "shards" / "00000.json").write_text('{"index":0,"attempt":1,"parts":[],"done":false}')
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    resumed = run(run_args(demo_models, [str(tmp_path / "in.fa")], str(out), "--workers", "1"))
    assert resumed.returncode == 65
    error = one_line_error(resumed.stderr)
    assert f"the run at {out} was planned by an earlier version of virnucpro" in error
    assert "another --output" in error
    status = run(virnucpro("status", "--output", str(out)))
    assert status.returncode == 65 and "planned by an earlier version" in one_line_error(status.stderr)
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written


def test_bench_without_a_gpu_is_a_usage_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = run(virnucpro("bench"))
    assert done.returncode == exit_codes.USAGE and "no CUDA GPU is visible" in done.stderr


# --- item 6: nothing imported from the start directory ----------------------------------------


def test_workers_import_nothing_from_the_start_directory(demo_models: Path, tmp_path: Path) -> None:
    start = tmp_path / "start"
    start.mkdir()
    marker = tmp_path / "planted-module-ran"
    (start / "concurrent.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    write_reads(tmp_path / "in.fa", 12, seed=4)
    args = run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "out"), "--workers", "1")
    args[1:1] = ["-P"]  # the parent as the `virnucpro` script runs it: without the start directory
    done = run(args, cwd=start)
    assert done.returncode == 0, done.stderr
    assert not marker.exists(), "a worker imported concurrent.py from the directory the job started in"


# --- items 7 and 10: stops, kills, parents gone -----------------------------------------------


def long_group_job(demo_models: Path, tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """One worker, one shard scored as one group that takes many seconds on the CPU."""
    write_reads(tmp_path / "many.fa", 1200, seed=6)
    out = tmp_path / "out"
    args = run_args(
        demo_models, [str(tmp_path / "many.fa")], str(out), "--workers", "1", "--shard-reads", "1200",
        "--group-reads", "1200", "--grace-seconds", "2", "--lease-seconds", "60", *extra,
    )
    return args, out


def test_a_stop_mid_group_releases_the_lease_within_the_grace_period(demo_models: Path, tmp_path: Path) -> None:
    args, out = long_group_job(demo_models, tmp_path)
    job = JobProcess(args, subprocess_env())
    assert job.wait_for("shard_claimed") is not None, job.log_text
    time.sleep(1)
    stopped = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 75, job.log_text
    # Before the parent's kill (grace + 5 s; its group alone takes far longer), loaded machines included.
    assert time.monotonic() - stopped < 2 + 5 + 3, "the worker did not stop within the grace period"
    events = [e["event"] for e in job.events]
    assert "killing_workers" not in events and "shard_released" in events, job.log_text
    state = shard_states(str(out))[0]
    assert state.owner is None and state.errors == () and state.lost == 0  # free, and not a failure
    resumed = run([*args, "--max-attempts", "1"])  # the stop did not use up an attempt
    assert resumed.returncode == 0, resumed.stderr


SLOW_PROGRESS = """
import sys, time
import job.batch, job.status

def slow_look(self):  # as a look at a run of 5,000 shards on S3: about a minute while planning
    time.sleep(120)

job.batch.PROGRESS_SECONDS = 0.2
job.status.RunWatch.look = slow_look
from job.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_reaches_the_workers_at_once_while_the_progress_look_is_slow(demo_models: Path, tmp_path: Path) -> None:
    """The progress look ran in the loop that forwards a stop to the workers: at 10^8 reads a
    SIGTERM waited up to a minute for it, past the grace period, and the workers were killed."""
    args, out = long_group_job(demo_models, tmp_path)
    job = JobProcess([sys.executable, "-c", SLOW_PROGRESS, *args[3:]], subprocess_env())
    assert job.wait_for("shard_claimed") is not None, job.log_text
    time.sleep(1)  # the progress thread is inside its first look now
    stopped = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == 75, job.log_text
    assert time.monotonic() - stopped < 2 + 5 + 3, "the stop waited for the progress look"
    events = [e["event"] for e in job.events]
    assert "killing_workers" not in events and "shard_released" in events, job.log_text
    assert shard_states(str(out))[0].owner is None


def test_ctrl_c_at_a_terminal_stops_the_workers_through_their_parent(demo_models: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole foreground process group: workers still importing
    (before their handlers exist) died of SIGINT, and the job reported them killed from
    outside ("out of memory?"). Workers lead a session of their own; the parent stops them."""
    args, _out = long_group_job(demo_models, tmp_path)
    job = JobProcess(args, subprocess_env(), own_group=True)
    assert job.wait_for("workers_started") is not None, job.log_text
    os.killpg(job.process.pid, signal.SIGINT)
    assert job.wait(timeout=60) == 75, job.log_text
    events = [e["event"] for e in job.events]
    assert "worker_killed" not in events and "killing_workers" not in events, job.log_text


def test_workers_stop_within_the_grace_period_when_their_parent_dies(demo_models: Path, tmp_path: Path) -> None:
    args, out = long_group_job(demo_models, tmp_path)
    job = JobProcess(args, subprocess_env())
    assert job.wait_for("shard_claimed") is not None, job.log_text
    workers = job.worker_pids()
    assert workers
    job.process.kill()
    killed = time.monotonic()
    job.wait(timeout=30)
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        # 1 s to notice, 2 s of grace, and slack for a loaded machine; its group alone takes far longer
        assert time.monotonic() - killed < 1 + 2 + 7, "a worker outlived its parent past the grace period"
        time.sleep(0.1)
    assert shard_states(str(out))[0].owner is None  # it gave its lease back


def test_a_worker_claims_nothing_until_its_parent_names_the_run(demo_models: Path, tmp_path: Path) -> None:
    """Workers load the models while the parent settles the plan (job/batch.py `_Workers`), and
    the output may hold another run's plan that the parent is about to refuse: a worker with
    its engine ready still touches no plan until the parent writes the run id on its stdin."""
    from job.config import RunConfig
    from job.inputs import resolve_inputs
    from job.plan import plan_run
    from job.worker import WorkerSpec, command

    write_reads(tmp_path / "in.fa", 12, seed=2)
    out = tmp_path / "out"
    store = LocalStore(str(out))
    settings = {"chunk_length": 500, "write_features": False, "write_viral_reads": False}
    plan = plan_run(store, resolve_inputs((str(tmp_path / "in.fa"),), None), settings, 6, None, threading.Event())
    config = RunConfig(
        inputs=(str(tmp_path / "in.fa"),), output=str(out), esm_model=str(demo_models / "esm2_demo.pt"),
        dnabert_model=str(demo_models / "dnabert_demo"), classifier=str(demo_models / "classifier_500.pth"),
        device="cpu", group_reads=6, checkpoint_seconds=0.2, lease_seconds=3, grace_seconds=10,
        model_cache=str(tmp_path / "model-cache"),
    )

    def written() -> dict[str, bytes]:
        return {str(path): path.read_bytes() for path in out.rglob("*") if path.is_file()}

    before = written()

    def started_worker() -> JobProcess:
        worker = JobProcess(command(), subprocess_env(), stdin=subprocess.PIPE)
        worker.process.stdin.write(WorkerSpec(config, 0, 1, os.getpid()).to_json() + "\n")
        worker.process.stdin.flush()
        assert worker.wait_for("engine_ready", timeout=180) is not None, "".join(worker.stderr)
        time.sleep(1.0)  # ready, and waiting
        assert written() == before, "a worker touched a plan nobody named"
        return worker

    other = started_worker()
    other.process.stdin.write("0123456789ab\n")  # another run than the output holds
    other.process.stdin.close()
    assert other.process.wait(timeout=60) == exit_codes.INTERNAL_ERROR
    assert written() == before
    assert not [e for e in other.events if e["event"] == "shard_claimed"]

    named = started_worker()
    named.process.stdin.write(f"{plan.run_id}\n")
    named.process.stdin.close()
    assert named.process.wait(timeout=120) == exit_codes.OK, "".join(named.stderr)
    assert all(state.final for state in shard_states(str(out)))


STOP_WHILE_WAITING = """
import os, signal, threading, time
from job.signals import stop_on_signals

stop = threading.Event()
stop_on_signals(stop)
with stop._cond:  # held, as stop.wait() holds it for a few bytecodes each call
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # a handler calling stop.set() here would wait for this lock forever
print("stopped" if stop.wait(10) else "not stopped")
"""


def test_a_stop_signal_arriving_inside_the_stop_events_wait_is_not_lost() -> None:
    out = run([sys.executable, "-c", STOP_WHILE_WAITING], timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "stopped", out.stderr


def test_a_stop_during_start_up_exits_75(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 5, seed=1)
    job = subprocess.Popen(run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "out")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    time.sleep(1.0)  # the interpreter is up; torch is being imported
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 75, stderr
    assert "Traceback" not in stderr


def test_a_worker_killed_from_outside_is_charged_and_retry_failed_finishes_the_run(
    demo_models: Path, tmp_path: Path,
) -> None:
    write_reads(tmp_path / "in.fa", 60, seed=7)
    clean = tmp_path / "clean"
    base = run_args(demo_models, [str(tmp_path / "in.fa")], str(clean), "--workers", "1", "--checkpoint-seconds", "0")
    assert run(base).returncode == 0
    out = tmp_path / "out"
    args = run_args(demo_models, [str(tmp_path / "in.fa")], str(out), "--workers", "1",
                    "--checkpoint-seconds", "0", "--max-attempts", "1")
    job = JobProcess(args, subprocess_env())
    committed = job.wait_for("part_committed")
    assert committed is not None and committed["committed"] < committed["shard_reads"], job.log_text
    os.kill(job.worker_pids()[0], signal.SIGKILL)  # as the OOM killer does
    assert job.wait() == 75, job.log_text  # transient for Batch: retried
    assert any(e["event"] == "worker_killed" for e in job.events)
    state = shard_states(str(out))[committed["shard"]]
    assert state.failed and state.owner is None and "killed by SIGKILL" in state.errors[0]
    assert state.reads_done == committed["committed"]  # its committed parts are kept
    failed = run(args)
    assert failed.returncode == 3 and "--retry-failed" in failed.stderr
    assert (out / "_FAILED").exists()
    retried = run([*args, "--retry-failed"])
    assert retried.returncode == 0, retried.stderr
    assert not (out / "_FAILED").exists() and (out / "_SUCCESS").exists()
    for name in FINAL_FILES:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["failed_shards"] == [] and summary["reads"] == 60
    again = run(args)  # finished now: reported, nothing rerun
    assert again.returncode == 0 and json.loads(again.stdout) == summary
    no_temporary_files(out)


# --- items 7 and 8: full and read-only disks ---------------------------------------------------


def test_disk_errors_map_to_75_or_65() -> None:
    assert disk_error_code(OSError(errno.ENOSPC, "full")) == 75
    assert disk_error_code(OSError(errno.EDQUOT, "quota")) == 75
    assert disk_error_code(OSError(errno.EROFS, "read-only")) == 65
    assert disk_error_code(OSError(errno.ECONNRESET, "reset")) is None
    assert disk_error_code(ValueError("x")) is None


def test_a_full_disk_names_the_destination_of_a_copy() -> None:
    # shutil.copyfile's error when the destination's disk fills (LocalStore.upload at the merge):
    # the source first, the destination second
    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/merge-1/reads.tsv", None, "/out/.reads.tsv.tmp")
    assert disk_error_message(full).startswith("no space left on the local disk writing /out/.reads.tsv.tmp;")
    assert "writing /out/x" in disk_error_message(OSError(errno.ENOSPC, "full", "/out/x"))


def test_url_credentials_are_redacted_in_log_events_and_uncaught_tracebacks() -> None:
    script = (
        "from job.log import configure, get_logger; configure()\n"
        "get_logger().error('unusable', error='EndpointConnectionError: \"http://key:SecretPass99@127.0.0.1:9/b\"')\n"
        "raise RuntimeError('no route to https://key:Secret@Pass99@127.0.0.1:9/b')\n"
    )
    out = run([sys.executable, "-c", script])
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "SecretPass99" not in out.stderr and "Pass99" not in out.stderr, out.stderr
    assert '"http://***@127.0.0.1:9/b' in out.stderr and "https://***@127.0.0.1:9/b" in out.stderr, out.stderr


def test_a_workers_command_line_holds_no_credentials_and_no_limit_on_the_inputs(
    demo_models: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's spec travels on its stdin: in argv, `ps` showed the endpoint's credentials
    to every user of the machine, and inputs past 128 KiB (Linux's limit on one argument)
    stopped the workers from starting at all."""
    import job.batch
    from job.batch import _Workers
    from job.config import RunConfig
    from job.log import get_logger

    inputs = tuple(f"{tmp_path}/{index:04d}-{'r' * 200}.fastq.gz" for index in range(700))  # 150 KB
    config = RunConfig(
        inputs=inputs, output=str(tmp_path / "out"), esm_model=str(demo_models / "esm2_demo.pt"),
        dnabert_model=str(demo_models / "dnabert_demo"), classifier=str(demo_models / "classifier_500.pth"),
        device="cpu", workers=2, s3_endpoint_url="http://keyuser:SecretPass99@127.0.0.1:9",
        model_cache=str(tmp_path / "model-cache"),
    )
    capfd.readouterr()
    seen = ""
    told = []  # how many workers had started when each heard its spec: all of them, so that
    tell = job.batch._tell  # a spec past the pipe's buffer never holds up the next start
    monkeypatch.setattr(job.batch, "_tell", lambda process, line, last=False: (
        told.append(len(workers.processes)), tell(process, line, last)))
    with _Workers(config, {}, get_logger()) as workers:
        workers.start()
        assert told == [2, 2]
        deadline = time.monotonic() + 180
        while seen.count('"engine_ready"') < 2:  # each read its spec and loaded the models
            assert time.monotonic() < deadline and all(p.poll() is None for p in workers.processes), seen
            time.sleep(0.2)
            seen += capfd.readouterr().err
        for process in workers.processes:
            argv = Path(f"/proc/{process.pid}/cmdline").read_bytes()
            assert b"SecretPass99" not in argv and b"rrrr" not in argv, argv
    assert [process.returncode for process in workers.processes] == [75, 75]  # stopped, never told a run
    assert "SecretPass99" not in seen + capfd.readouterr().err


def test_status_of_a_missing_bucket_is_one_line_and_credentials_in_the_endpoint_are_refused_unprinted(
    demo_models: Path, tmp_path: Path, s3_endpoint: str,  # noqa: F811
) -> None:
    out = run(virnucpro("status", "--output", "s3://no-such-bucket/out", "--s3-endpoint-url", s3_endpoint))
    assert out.returncode == 65, out.stderr
    assert one_line_error(out.stderr).startswith("virnucpro: error: cannot read the run at s3://no-such-bucket/out")
    # user:password@ in the endpoint: `run` waited forever inside s3fs; refused at once now
    endpoint = s3_endpoint.replace("http://", "http://keyuser:SecretPass99@")
    for args in (virnucpro("status", "--output", "s3://bucket/out", "--s3-endpoint-url", endpoint),
                 run_args(demo_models, ["s3://bucket/in/"], "s3://bucket/out", "--s3-endpoint-url", endpoint)):
        out = run(args, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "--s3-endpoint-url must not hold credentials" in out.stderr, out.stderr
        assert "SecretPass99" not in out.stdout + out.stderr, out.stderr
    status = virnucpro("status", "--output", "s3://bucket/out")
    for variable, value, error in (("AWS_ENDPOINT_URL_S3", endpoint, "AWS_ENDPOINT_URL_S3 must not hold credentials"),
                                   ("AWS_ENDPOINT_URL", endpoint, "AWS_ENDPOINT_URL must not hold credentials"),
                                   ("AWS_ENDPOINT_URL", "http://[SecretPass99", "AWS_ENDPOINT_URL is not an http"),
                                   ("AWS_ENDPOINT_URL_S3", "minio:SecretPass99@127.0.0.1:9", "must not hold credentials"),
                                   ("AWS_ENDPOINT_URL", "localhost:9000", "AWS_ENDPOINT_URL is not an http")):
        env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_ENDPOINT_URL")}
        out = subprocess.run(status, capture_output=True, text=True, env={**env, variable: value}, timeout=60)
        assert out.returncode == 2 and error in out.stderr, out.stderr
        assert "SecretPass99" not in out.stdout + out.stderr, out.stderr


FULL_DISK_AT_MERGE = """
import errno, sys
from job.cli import main
from job.store import LocalStore

def full(self, key, path):
    raise OSError(errno.ENOSPC, "No space left on device", str(self.root / key))

LocalStore.upload = full
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_at_the_merge_exits_75_in_one_line_and_leaves_nothing_behind(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 30, seed=8)
    out = tmp_path / "out"
    args = run_args(demo_models, [str(tmp_path / "in.fa")], str(out), "--workers", "1")
    full = run([sys.executable, "-c", FULL_DISK_AT_MERGE, *args[3:]])
    assert full.returncode == 75, full.stderr
    assert "no space left on the local disk writing" in one_line_error(full.stderr)
    assert not (out / "_SUCCESS").exists()
    done = run(args)
    assert done.returncode == 0, done.stderr
    no_temporary_files(out)


def test_a_full_disk_in_a_worker_is_not_charged_to_the_shard(tmp_path: Path) -> None:
    run_config, store = make_run(tmp_path, 20, shard_reads=10, group_reads=2, checkpoint_seconds=0.0)

    class FullDisk(LocalStore):
        def put(self, key: str, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", key)

    with pytest.raises(OSError) as full:
        work(run_config, FullDisk(store.uri), FakePredictor(2))
    assert disk_error_code(full.value) == 75
    state, _ = read_shard(store, 0)
    assert state.owner is None and state.errors == () and not state.failed


# --- item 8: no leftovers, no rewritten marker -------------------------------------------------


def test_a_zombie_resuming_after_the_merge_writes_nothing(tmp_path: Path) -> None:
    from job.plan import load_plan as plan_of
    from job.worker import Worker, WorkerSpec

    run_config, store = make_run(tmp_path, 9, shard_reads=10, group_reads=5, checkpoint_seconds=0.0)
    zombie = Worker(WorkerSpec(run_config, 0, 1, 0), store, plan_of(store), FakePredictor(5), "cpu", threading.Event())
    lease = claim(store, 0, zombie.owner, 1.0, "cpu", ExpiryObserver())
    plan = plan_of(store)
    results = list(FakePredictor(5).predict(shard_records(plan, plan.shards[0], None, store)))
    clock = FakeClock(0.0)  # the zombie is stopped; another worker sees its lease run out
    heir_observer = ExpiryObserver(clock)
    assert claim(store, 0, "heir", 60.0, "cpu", heir_observer) is None
    clock.advance(1.0)
    heir = claim(store, 0, "heir", 60.0, "cpu", heir_observer)
    assert heir is not None and heir.release()
    assert work(run_config, store, FakePredictor(5)) == 0
    finish = MergeClaim(store, "merger", 30.0)
    assert finish.acquire()
    assert merge(store, plan_of(store), MergeInputs(False, DIM, True, None, 30.0), finish, threading.Event())[0] == SUCCESS
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    log = zombie.log
    assert zombie._commit(lease, results[:5], 0.1, 10, log) is False  # it resumes: refused
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "the zombie left something behind"


def test_a_stale_merger_cannot_rewrite_a_finished_run(tmp_path: Path) -> None:
    run_config, store = make_run(tmp_path, 9, shard_reads=5, group_reads=5, checkpoint_seconds=0.0)
    assert work(run_config, store, FakePredictor(5)) == 0
    plan = load_plan(store)
    inputs = MergeInputs(False, DIM, True, None, 1.0)
    stale = MergeClaim(store, "stale", 1.0)
    assert stale.acquire()  # then it is stopped for longer than its lease
    clock = FakeClock(0.0)
    heir = MergeClaim(store, "heir", 30.0, ExpiryObserver(clock))
    assert not heir.acquire()
    clock.advance(1.0)
    assert heir.acquire()
    assert merge(store, plan, inputs, heir, threading.Event())[0] == SUCCESS
    out = Path(run_config.output)
    written = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    time.sleep(0.01)
    marker, _ = merge(store, plan, inputs, stale, threading.Event())  # it resumes
    assert marker == SUCCESS
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == written
    assert store.create(SUCCESS, b"{}") is None  # the marker is created once, never replaced


def test_a_rerun_waiting_for_a_lease_says_how_long(demo_models: Path, tmp_path: Path) -> None:
    """A rerun right after a machine was lost finds its lease held: it says so with the time left."""
    write_reads(tmp_path / "in.fa", 30, seed=9)
    out = tmp_path / "out"
    args = run_args(demo_models, [str(tmp_path / "in.fa")], str(out), "--workers", "1", "--lease-seconds", "6",
                    "--checkpoint-seconds", "0")
    first = JobProcess(args, subprocess_env())
    assert first.wait_for("part_committed") is not None, first.log_text
    lost = first.worker_pids()
    for pid in lost:
        os.kill(pid, signal.SIGSTOP)  # the machine is lost: nothing is released
    first.process.kill()
    first.wait(timeout=30)
    try:
        rerun = JobProcess(args, subprocess_env())
        waiting = rerun.wait_for("waiting_for_lease", timeout=120)
        assert waiting is not None and 0 < waiting["seconds_left"] <= 6, rerun.log_text
        assert rerun.wait() == 0, rerun.log_text
    finally:
        for pid in lost:
            os.kill(pid, signal.SIGKILL)
    assert sum(state.lost for state in shard_states(str(out))) >= 1


def test_no_test_process_can_connect_beyond_loopback() -> None:
    """The guard is in place in pytest and in every process the tests start (checked without
    connecting anywhere)."""
    import socket

    probe = (
        "import socket; from pathlib import Path\n"
        "assert socket.socket.connect.__name__ == '_guarded_connect'\n"
        "print('guarded')\n"
    )
    assert run([sys.executable, "-c", probe]).stdout == "guarded\n"
    assert socket.socket.connect.__name__ == "_guarded_connect"
    guard = socket.socket.connect.__globals__["_check"]
    with socket.socket() as sock:
        with pytest.raises(ConnectionRefusedError, match="test guard"):
            guard(sock, ("169.254.169.254", 80))
        guard(sock, ("127.0.0.1", 80))  # loopback passes


def test_a_worker_whose_parent_died_while_writing_its_spec_exits_75_without_a_traceback() -> None:
    from job.worker import command

    worker = subprocess.run(command(), input='{"config": {"inputs": ["a.fa"', capture_output=True, text=True,
                            env=subprocess_env(), timeout=120)
    assert worker.returncode == 75 and "Traceback" not in worker.stderr, worker.stderr
