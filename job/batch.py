"""`virnucpro run` as a spot-safe batch job: plan, workers, merge. The same command resumes.

One run lives under its output URI (see README, "Batch job"). Every process that runs the
command does the same thing, so starting it again, or on N machines at once, is safe:

1. plan the run, or adopt the plan already there (refusing changed inputs or arguments);
2. start the workers (one per visible GPU, or --workers on CPU) and wait until every shard
   is done or failed, by them or by workers elsewhere;
3. merge, unless another process holds the merge, in which case wait for its marker.

SIGTERM, SIGINT or a spot notice stop it: the workers get SIGTERM, commit what they have and
release their shards; the command exits 75 (INTERRUPTED), and rerunning it resumes. A worker
killed from outside (the OOM killer's SIGKILL) has its shard charged with an error (so a
shard that kills every worker fails after --max-attempts instead of looping) and freed at
once; the command then exits 75 unless the other workers finished the run. Every transient
failure (a stop, a killed worker, a full local disk) exits 75 with a one-line reason.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

from botocore.exceptions import BotoCoreError, ClientError

from core.errors import UserError
from core.pipeline import PUBLISHED_DNA_DIM, PUBLISHED_PROTEIN_DIM, check_models
from job import exit_codes
from job.config import RunConfig
from job.errors import BadInput, Interrupted, disk_error_code, disk_error_message
from job.inputs import resolve_inputs
from job.log import get_logger
from job.merge import DEMO_WARNING, FAILED, MERGE_KEY, MergeClaim, MergeInputs, merge, read_marker
from job.models import localize_model
from job.plan import Plan, plan_run
from job.shards import charge_dead_worker, reopen_failed
from job.spot import SpotWatcher
from job.status import run_status
from job.store import Store, open_store
from job.worker import WorkerSpec, command, owner_prefix

PROGRESS_SECONDS = 30.0
KILL_MARGIN_SECONDS = 5.0  # on top of --grace-seconds before stragglers are killed


def run_batch(config: RunConfig, stop: threading.Event | None = None) -> int:
    """Run (or resume, or report) the job; returns the process exit code.

    `stop` is the event the caller's SIGTERM/SIGINT handlers set, when it installed them
    before importing this module (a stop during start-up then exits 75 too)."""
    stop = stop or threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    spot = SpotWatcher(config.imds_url, stop.set)
    spot.start()
    log = get_logger(output=config.output)
    try:
        return _BatchRun(config, stop).run()
    except UserError as exc:  # bad input, model or arguments: BadInput, ModelLoadError, FastaError...
        log.error("bad_input", error=str(exc))
        print(f"virnucpro: error: {exc}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except Interrupted as exc:
        log.warning("interrupted", reason=str(exc), message="rerun the same command to resume")
        print(f"virnucpro: interrupted: {exc}; rerun the same command to resume", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except OSError as exc:
        code = disk_error_code(exc)
        if code is None:
            raise
        log.error("local_disk_error", error=disk_error_message(exc), exit_code=code)
        print(f"virnucpro: error: {disk_error_message(exc)}", file=sys.stderr)
        return code
    finally:
        spot.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _BatchRun:
    def __init__(self, config: RunConfig, stop: threading.Event) -> None:
        self.config, self.stop = config, stop
        self.endpoint = config.s3_endpoint_url
        self.owner = f"{socket.gethostname()}-{os.getpid()}"
        self.log = get_logger(output=config.output)

    def run(self) -> int:
        _check_numbers(self.config)
        if self.stop.is_set():
            raise Interrupted("stopped during start-up")
        store = open_store(self.config.output, self.endpoint)
        try:
            finished = read_marker(store)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise _unusable_output(store, exc) from None
        if finished is None or self.config.retry_failed:  # nothing is written after the marker
            _check_writable(store, self.owner)
        inputs = resolve_inputs(self.config.inputs, self.endpoint)
        models = {
            name: localize_model(getattr(self.config, name), self.config.model_cache, self.endpoint)
            for name in ("esm_model", "dnabert_model", "classifier")
        }
        # Before the plan: a model that cannot work is refused before the run is tied to it.
        chunk_length, feature_dim = check_models(
            models["esm_model"].path, models["dnabert_model"].path, models["classifier"].path,
            self.config.chunk_length, self.config.force_chunk_length,
        )
        if self.stop.is_set():
            raise Interrupted("stopped during start-up")
        settings = {
            **{name: model.identity() for name, model in models.items()},
            "chunk_length": chunk_length,
            "write_features": self.config.write_features,
            "group_reads": self.config.group_reads,
        }
        # A finished run too is checked against these inputs and models (refused with 65).
        plan = plan_run(store, inputs, settings, self.config.shard_reads, self.endpoint, self.stop)
        if (marker := read_marker(store)) is not None:
            if not (marker[0] == FAILED and self.config.retry_failed):
                self.log.info("already_finished", marker=marker[0], run_id=plan.run_id)
                return _report(*marker)
            reopened = reopen_failed(store, range(len(plan.shards)))
            store.delete([FAILED])
            self.log.info("retrying_failed_shards", shards=reopened, run_id=plan.run_id)
        self.log = self.log.bind(run_id=plan.run_id)
        self.log.info("run_planned", shards=len(plan.shards), reads=plan.total_reads, inputs=len(plan.inputs))
        demo_models = feature_dim != PUBLISHED_DNA_DIM + PUBLISHED_PROTEIN_DIM
        if demo_models:
            self.log.warning("demo_models", message=DEMO_WARNING)
        worker_config = replace(
            self.config,
            esm_model=models["esm_model"].path,
            dnabert_model=models["dnabert_model"].path,
            classifier=models["classifier"].path,
            chunk_length=chunk_length,
        )
        if not _all_final(store, plan):
            codes, killed = self._run_workers(store, plan, worker_config)
            if self.stop.is_set():
                raise Interrupted("stopped while the workers ran")
            if not _all_final(store, plan):
                if killed:
                    raise Interrupted(f"{killed[0]}; its shard was charged with an error")
                if exit_codes.INTERRUPTED in codes:
                    raise Interrupted("a worker stopped (its one-line reason is above)")
                if codes and all(code == exit_codes.BAD_INPUT for code in codes):
                    return exit_codes.BAD_INPUT  # the workers printed the reason
                self.log.error("workers_exited_early", exit_codes=codes, message="rerun the same command to resume")
                return exit_codes.INTERNAL_ERROR
        merge_inputs = MergeInputs(
            write_features=self.config.write_features,
            feature_dim=feature_dim,
            demo_models=demo_models,
            endpoint_url=self.endpoint,
            lease_seconds=self.config.lease_seconds,
        )
        return _report(*self._finish(store, plan, merge_inputs))

    def _run_workers(self, store: Store, plan: Plan, config: RunConfig) -> tuple[list[int], list[str]]:
        """Run the workers until they all exit: their exit codes, and how those that were
        killed from outside died (their shards are charged, see job/shards.py)."""
        gpus = _visible_gpus(config)
        count = self.config.workers or max(len(gpus), 1)
        processes = []
        for index in range(count):
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
            spec = WorkerSpec(config, index, count, os.getpid())
            processes.append(subprocess.Popen(command(spec), env=env))
        self.log.info("workers_started", workers=count, gpus=len(gpus))
        deadline = None
        last_progress = time.monotonic()
        killed: list[str] = []
        charged: set[int] = set()
        while True:
            for process in processes:
                if process.poll() is not None and process.returncode < 0 and deadline is None and process.pid not in charged:
                    charged.add(process.pid)
                    killed.append(self._charge(store, plan, process))
            if all(process.poll() is not None for process in processes):
                break
            if self.stop.is_set() and deadline is None:
                deadline = time.monotonic() + self.config.grace_seconds + KILL_MARGIN_SECONDS
                self.log.warning("stopping_workers", grace_seconds=self.config.grace_seconds)
                _signal_all(processes, signal.SIGTERM)
            if deadline is not None and time.monotonic() > deadline:
                self.log.error("killing_workers", message="workers did not stop within the grace period")
                _signal_all(processes, signal.SIGKILL)
            if time.monotonic() - last_progress >= PROGRESS_SECONDS:
                last_progress = time.monotonic()
                status = run_status(store, plan)
                if status is not None:
                    self.log.info("progress", **status.as_dict())
            time.sleep(0.2)
        return [process.returncode for process in processes], killed

    def _charge(self, store: Store, plan: Plan, process: subprocess.Popen) -> str:
        """A worker died of a signal this process did not send (the OOM killer, a user's kill):
        charge its shard with an error and free it, so that the other workers, or a rerun,
        retry it and a shard that kills every worker fails after --max-attempts."""
        name = signal.Signals(-process.returncode).name
        error = f"the worker was killed by {name} (out of memory?) while working on this shard"
        shards = charge_dead_worker(
            store, range(len(plan.shards)), owner_prefix(process.pid), error, self.config.max_attempts
        )
        self.log.error("worker_killed", pid=process.pid, signal=name, shards=shards, message=error)
        return f"a worker was killed by {name} (out of memory?)"

    def _finish(self, store: Store, plan: Plan, merge_inputs: MergeInputs) -> tuple[str, dict]:
        """Merge, or wait while another process merges (and take over if it dies)."""
        claim = MergeClaim(store, self.owner, self.config.lease_seconds)
        poll = min(self.config.lease_seconds / 4, 5.0)
        while (marker := read_marker(store)) is None:
            if self.stop.is_set():
                raise Interrupted("stopped while waiting for the merge")
            if claim.acquire():
                self.log.info("merge_started")
                try:
                    return merge(store, plan, merge_inputs, claim, self.stop)
                except BaseException:
                    claim.release()
                    raise
            claim.observer.log_waiting(self.log, "waiting_for_merge", MERGE_KEY)
            self.stop.wait(poll)
        return marker


def _check_numbers(config: RunConfig) -> None:
    for flag, value, least in (
        ("--shard-reads", config.shard_reads, 1), ("--group-reads", config.group_reads, 1),
        ("--workers", config.workers or 1, 1), ("--max-attempts", config.max_attempts, 1),
        ("--lease-seconds", config.lease_seconds, 0.1), ("--checkpoint-seconds", config.checkpoint_seconds, 0),
        ("--grace-seconds", config.grace_seconds, 0),
    ):
        if value < least:
            raise BadInput(f"{flag} must be at least {least}, not {value}")


def _check_writable(store: Store, owner: str) -> None:
    probe = f"_run/probes/{owner}"
    try:
        store.put(probe, b"")
        store.delete([probe])
    except (ClientError, BotoCoreError, OSError) as exc:
        raise _unusable_output(store, exc) from None


def _unusable_output(store: Store, exc: Exception) -> BadInput:
    return BadInput(
        f"cannot write to output {store.uri} ({type(exc).__name__}: {exc}); check that the "
        "bucket or directory exists and these credentials may write and delete there, or "
        "choose another --output"
    )


def _all_final(store: Store, plan: Plan) -> bool:
    status = run_status(store, plan)
    return status is not None and status.done + status.failed == status.shards


def _visible_gpus(config: RunConfig) -> list[str]:
    """CUDA device ids to hand out to the workers, one each (round robin); empty on CPU."""
    if config.device == "cpu":
        return []
    import torch

    count = torch.cuda.device_count()
    listed = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def _signal_all(processes: list[subprocess.Popen], signum: int) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signum)


def _report(marker: str, summary: dict) -> int:
    """Print the run's summary on stdout; the exit code says whether every shard succeeded."""
    print(json.dumps(summary, indent=2, sort_keys=True))
    if marker != FAILED:
        return exit_codes.OK
    print("virnucpro: the run finished with failed shards (_FAILED lists their errors); fix their "
          "cause and rerun the same command with --retry-failed to run them again", file=sys.stderr)
    return exit_codes.SHARDS_FAILED
