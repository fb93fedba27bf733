"""`virnucpro run` as a spot-safe batch job: plan, workers, merge. The same command resumes.

One run lives under its output URI (see README, "Batch job"). Every process that runs the
command does the same thing, so starting it again, or on N machines at once, is safe:

1. write the plan's header, or adopt the one already there (refusing changed inputs or
   arguments), and start the planner thread: the one starter holding `_run/planner.json`
   scans the inputs and publishes shards as it goes (job/plan.py); the others stand by to
   take over should it die;
2. the workers (one per visible GPU, or --workers on CPU) are started before step 1, as
   soon as the models are local, so that they load and compile while this process checks
   the models and settles the plan; once it is settled they are told the run id and claim
   shards as they are published, and the command waits until the plan is complete and
   every shard is done or failed, by them or by workers elsewhere;
3. merge, unless another process holds the merge, in which case wait for its marker.

SIGTERM, SIGINT or a spot notice stop it: the workers get SIGTERM, commit what they have and
release their shards; the command exits 75 (INTERRUPTED), and rerunning it resumes. A worker
killed from outside (the OOM killer's SIGKILL) has its shard charged with an error (so a
shard that kills every worker fails after --max-attempts instead of looping) and freed at
once; the command then exits 75 unless the other workers finished the run. Every transient
failure (a stop, a killed worker, a full local disk) exits 75 with a one-line reason.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from typing import Any

import pynvml
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import UserError
from job import exit_codes
from job.config import RunConfig
from job.errors import BadInput, Interrupted, RunDamaged, disk_error_code, disk_error_message
from job.inputs import InputObject, resolve_inputs
from job.lease import ExpiryObserver, Renewer
from job.lease import claim as take_claim
from job.log import for_people, get_logger, redact
from job.merge import DEMO_WARNING, FAILED, MERGE_KEY, MergeClaim, MergeInputs, merge, read_marker
from job.models import LocalModel, checked_models, localize_model
from job.plan import PLANNER_KEY, Plan, Planner, load_plan, plan_header
from job.shards import charge_dead_worker, reopen_failed
from job.spot import SpotWatcher
from job.status import RunStatus, RunWatch, run_status
from job.signals import stop_on_signals
from job.store import Store, open_store
from job.worker import WorkerSpec, command, owner_prefix

PROGRESS_SECONDS = 30.0
BAR_SECONDS = 1.0  # the progress bar's refresh (a terminal is watched by a person)
KILL_MARGIN_SECONDS = 5.0  # on top of --grace-seconds before stragglers are killed


def run_batch(config: RunConfig, stop: threading.Event | None = None) -> int:
    """Run (or resume, or report) the job; returns the process exit code.

    `stop` is the event the caller's SIGTERM/SIGINT handlers set, when it installed them
    before importing this module (a stop during start-up then exits 75 too); without one,
    the handlers are installed here for the call."""
    restore_signals = stop_on_signals(stop := threading.Event()) if stop is None else None
    spot = SpotWatcher(config.imds_url, stop.set)
    spot.start()
    log = get_logger(output=config.output)
    try:
        return _BatchRun(config, stop).run()
    except UserError as exc:  # bad input, model or arguments: BadInput, ModelLoadError, ReadsError...
        if not for_people(config.log_format):  # a person reads the line printed next, once
            log.error("bad_input", error=str(exc))
        print(f"virnucpro: error: {redact(str(exc))}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except RunDamaged as exc:
        log.error("run_damaged", error=str(exc))
        print(f"virnucpro: error: {redact(str(exc))}", file=sys.stderr)
        return exit_codes.INTERNAL_ERROR
    except Interrupted as exc:
        if not for_people(config.log_format):  # a person reads the line printed next, once
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
        if restore_signals is not None:
            restore_signals()


class _BatchRun:
    def __init__(self, config: RunConfig, stop: threading.Event) -> None:
        self.config, self.stop = config, stop
        self.endpoint = config.s3_endpoint_url
        self.owner = f"{socket.gethostname()}-{os.getpid()}"
        self.log = get_logger(output=config.output)

    def run(self) -> int:
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
            name: localize_model(getattr(self.config, name), self.config.model_cache, self.endpoint, self.stop)
            for name in ("esm_model", "dnabert_model", "classifier")
        }
        if self.stop.is_set():  # no worker is started once stopped
            raise Interrupted("stopped during start-up")
        # The workers get the user's config with the models made local (downloaded from S3 and
        # checksummed once here, so every worker loads the same bytes): nothing else differs.
        worker_config = replace(
            self.config,
            esm_model=models["esm_model"].path,
            dnabert_model=models["dnabert_model"].path,
            classifier=models["classifier"].path,
        )
        with _Workers(worker_config, {name: model.identity() for name, model in models.items()}, self.log) as workers:
            if finished is None:  # a finished run needs none, unless --retry-failed reopens shards
                workers.start()
            return self._settle_and_run(store, inputs, models, workers)

    def _settle_and_run(
        self, store: Store, inputs: list[InputObject], models: dict[str, LocalModel], workers: _Workers,
    ) -> int:
        """Check the models, settle the plan, let the workers run it, merge."""
        # Before the plan: a model that cannot work is refused before the run is tied to it.
        chunk_length, feature_dim, demo_models = checked_models(
            models, self.config.chunk_length, self.config.force_chunk_length, self.config.model_cache
        )
        if self.stop.is_set():
            raise Interrupted("stopped during start-up")
        settings = {
            **{name: model.identity() for name, model in models.items()},
            "chunk_length": chunk_length,
            "write_features": self.config.write_features,
            "group_reads": self.config.group_reads,
            "reuse": self.config.reuse,
            "min_virus_score": self.config.min_virus_score,
            "write_viral_reads": self.config.write_viral_reads,
        }
        # A finished run too is checked against these inputs and models (refused with 65).
        header = plan_header(store, inputs, settings, self.config.shard_reads, self.endpoint)
        if (marker := read_marker(store)) is not None:
            if not (marker[0] == FAILED and self.config.retry_failed):
                self.log.info("already_finished", marker=marker[0], run_id=header.run_id)
                return _report(*marker)
            finished = load_plan(store, header)  # a finished run's plan is complete
            assert finished is not None and finished.complete
            reopened = reopen_failed(store, range(len(finished.shards)))
            store.delete([FAILED])
            self.log.info("retrying_failed_shards", shards=reopened, run_id=header.run_id)
        self.log = self.log.bind(run_id=header.run_id)
        self.log.info(
            "run_planned", shard_reads=header.shard_reads, inputs=len(header.inputs), input_bytes=header.input_bytes
        )
        if demo_models:
            self.log.warning("demo_models", message=DEMO_WARNING)
        planner = _PlanThread(store, header, self.endpoint, self.stop, self.owner, self.config.lease_seconds)
        planner.start()
        try:
            plan = load_plan(store, header)
            assert plan is not None
            if not (plan.complete and _all_final(store, plan)):
                workers.begin(header.run_id)
                codes, killed = self._run_workers(store, plan, workers, planner)
                if self.stop.is_set():
                    raise Interrupted("stopped while the workers ran")
                plan = self._complete_plan(store, plan, planner)
                if not _all_final(store, plan):
                    if killed:
                        raise Interrupted(f"{killed[0]}; its shard was charged with an error")
                    if exit_codes.BAD_INPUT in codes:
                        return exit_codes.BAD_INPUT  # the worker printed the reason
                    if exit_codes.INTERRUPTED in codes:
                        raise Interrupted("a worker stopped (its one-line reason is above)")
                    self.log.error("workers_exited_early", exit_codes=codes, message="rerun the same command to resume")
                    return exit_codes.INTERNAL_ERROR
            else:  # every shard is final already: only the merge is left
                workers.stop()
            plan = self._complete_plan(store, plan, planner)
        finally:
            planner.finish()
        self.log.info("plan_loaded", shards=len(plan.shards), reads=plan.total_reads)
        merge_inputs = MergeInputs(
            write_features=self.config.write_features,
            feature_dim=feature_dim,
            demo_models=demo_models,
            endpoint_url=self.endpoint,
            lease_seconds=self.config.lease_seconds,
            gpu_hour_price=self.config.gpu_hour_price,
        )
        return _report(*self._finish(store, plan, merge_inputs))

    def _complete_plan(self, store: Store, plan: Plan, planner: _PlanThread) -> Plan:
        """The whole plan, once the planner (here or elsewhere) has published it."""
        while True:
            loaded = load_plan(store, plan)
            assert loaded is not None
            if loaded.error:
                raise BadInput(loaded.error)
            if loaded.complete:
                return loaded
            if planner.exception is not None:
                raise planner.exception
            if self.stop.wait(0.2):
                raise Interrupted("stopped while planning")

    def _run_workers(
        self, store: Store, plan: Plan, workers: _Workers, planner: _PlanThread,
    ) -> tuple[list[int], list[str]]:
        """Watch the workers until they all exit: their exit codes, and how those that were
        killed from outside died (their shards are charged, see job/shards.py)."""
        # The report's matplotlib is loaded here while the workers run, not in the merge: there
        # its import (~0.6 CPU s, holding the GIL) slowed the threads fetching the parts by ~1 s.
        threading.Thread(target=importlib.import_module, args=("job.report",), daemon=True).start()
        processes = workers.processes
        progress = _Progress(RunWatch(store, plan, at_work=True), for_people(self.config.log_format), self.log)
        progress.start()
        killed: list[str] = []
        charged: set[int] = set()
        try:
            while True:
                for process in processes:
                    if process.poll() is not None and process.returncode < 0 and not workers.stopping and process.pid not in charged:
                        charged.add(process.pid)
                        killed.append(self._charge(store, plan, process))
                if all(process.poll() is not None for process in processes):
                    break
                if self.stop.is_set() and not workers.stopping:
                    self.log.warning("stopping_workers", grace_seconds=self.config.grace_seconds)
                    workers.terminate()
                bad_input = any(process.returncode == exit_codes.BAD_INPUT for process in processes)
                if bad_input or planner.exception is not None:
                    workers.terminate()  # bad input, or the planner here failed: the run stops
                if workers.kill_late():
                    self.log.error("killing_workers", message="workers did not stop within the grace period")
                time.sleep(0.2)
        except BaseException:  # the bar's line is ended, without a last look, and the error goes on
            progress.finish(last_look=False)
            raise
        progress.finish(last_look=not self.stop.is_set())
        return [process.returncode for process in processes], killed

    def _charge(self, store: Store, plan: Plan, process: subprocess.Popen) -> str:
        """A worker died of a signal this process did not send (the OOM killer, a user's kill):
        charge its shard with an error and free it, so that the other workers, or a rerun,
        retry it and a shard that kills every worker fails after --max-attempts."""
        name = signal.Signals(-process.returncode).name
        error = f"the worker was killed by {name} (out of memory?) while working on this shard"
        published = load_plan(store, plan) or plan  # shards published since the workers started
        shards = charge_dead_worker(
            store, range(len(published.shards)), owner_prefix(process.pid), error, self.config.max_attempts
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


class _Workers:
    """This machine's worker processes (job/worker.py), started before the plan is settled.

    Loading ESM-2 3B and compiling take a worker seconds that do not depend on the plan, so
    they overlap this process's model checks and plan; a worker waits for `begin` to name
    the run before it reads any plan (the output may hold another run's, about to be
    refused). Leaving the block stops the workers still running, within the grace period.
    """

    def __init__(self, config: RunConfig, models: dict[str, dict[str, str | None]], log: Any) -> None:
        self.config, self.models, self.log = config, models, log
        self.processes: list[subprocess.Popen] = []
        self._kill_after: float | None = None  # set by terminate(): when stragglers get SIGKILL
        self._killed = False

    def __enter__(self) -> _Workers:
        return self

    def start(self) -> None:
        gpus = _visible_gpus(self.config)
        count = self.config.workers or max(len(gpus), 1)
        for index in range(count):
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
            # A session of its own: a terminal's Ctrl-C goes to the whole foreground group, and a
            # worker still importing (its handlers not yet in place) died of it; the worker
            # hears of a stop from us (terminate) or from our death (job/worker.py)
            self.processes.append(subprocess.Popen(command(), env=env, stdin=subprocess.PIPE, start_new_session=True))
        # Every worker is started before any hears its spec: a spec past the pipe's buffer
        # (64 KiB: thousands of inputs) waits until its worker's Python is up to read it
        for index, process in enumerate(self.processes):
            _tell(process, WorkerSpec(self.config, index, count, os.getpid(), self.models).to_json())
        self.log.info("workers_started", workers=count, gpus=len(gpus))

    def begin(self, run_id: str) -> None:
        """Name the run to every worker (starting them first when they were not)."""
        if not self.processes:
            self.start()
        for process in self.processes:
            _tell(process, run_id, last=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        """Whether terminate() was called: from then on a worker that dies of a signal was
        stopped by us, not killed from outside."""
        return self._kill_after is not None

    def terminate(self) -> None:
        """SIGTERM the workers still running, once: they have the grace period, and a margin,
        to commit, release their shards and exit before kill_late() kills them."""
        if self._kill_after is None:
            self._kill_after = time.monotonic() + self.config.grace_seconds + KILL_MARGIN_SECONDS
            _signal_all(self.processes, signal.SIGTERM)

    def kill_late(self) -> bool:
        """SIGKILL the workers still running past terminate()'s deadline; True the one time it does."""
        if self._killed or self._kill_after is None or time.monotonic() < self._kill_after:
            return False
        self._killed = True
        _signal_all(self.processes, signal.SIGKILL)
        return True

    def stop(self) -> None:
        """Terminate the workers still running and wait for them to exit (SIGKILL past the deadline)."""
        self.terminate()
        while any(process.poll() is None for process in self.processes):
            self.kill_late()
            time.sleep(0.1)


class _PlanThread(threading.Thread):
    """Plans the run when this process holds the planner claim (`_run/planner.json`, a
    lease: job/lease.py); stands by otherwise, and takes the claim over when the planner
    holding it stops renewing it (the new planner re-scans and re-creates identical objects)."""

    def __init__(
        self, store: Store, plan: Plan, endpoint: str | None, stop: threading.Event, owner: str, lease_seconds: float,
    ) -> None:
        super().__init__(daemon=True, name="planner")
        self.store, self.plan, self.endpoint, self.stop = store, plan, endpoint, stop
        self.owner, self.lease_seconds = owner, lease_seconds
        self.observer = ExpiryObserver()
        self.exception: BaseException | None = None
        self._finished = threading.Event()
        self._poll = min(lease_seconds / 4, 2.0)
        self.log = get_logger(run_id=plan.run_id)

    def run(self) -> None:
        try:
            while not (self.stop.is_set() or self._finished.is_set()):
                plan = load_plan(self.store, self.plan)
                if plan is None or plan.complete or plan.error:
                    return
                lease = take_claim(self.store, PLANNER_KEY, self.owner, self.lease_seconds, self.observer)
                if lease is not None:
                    with Renewer(lease, self.log):
                        try:
                            Planner(self.store, self.plan, self.endpoint, self.stop, lost=lease.lost).scan()
                        finally:  # done, stopped or failed: free at once for the next starter
                            lease.release()
                    return
                self.observer.log_waiting(self.log, "waiting_for_planner", PLANNER_KEY)
                self._finished.wait(self._poll)
        except Interrupted:
            return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            self.log.error("planner_error", error=f"{type(exc).__name__}: {exc}")
            self.exception = exc

    def finish(self) -> None:
        self._finished.set()
        self.join(timeout=30)


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
    if not plan.complete:
        return False
    status = run_status(store, plan)
    return status is not None and status.done + status.failed == status.shards


def _visible_gpus(config: RunConfig) -> list[str]:
    """CUDA device ids to hand out to the workers, one each (round robin); empty on CPU.

    The driver's count comes from NVML (NVIDIA's management library, as nvidia-smi reads
    it), not torch: importing torch takes seconds on a fresh machine, and the workers are
    started before anything else needs it. CUDA_VISIBLE_DEVICES, when set, names the GPUs."""
    if config.device == "cpu":
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, or no NVIDIA GPU: the workers run on the CPU
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


class _Progress(threading.Thread):
    """How far the run is, while the workers run: a bar redrawn every BAR_SECONDS for a
    person, a `progress` log line every PROGRESS_SECONDS otherwise. Its own thread, because
    a look at a large run reads thousands of shard records (seconds, at 10^8 reads half a
    minute while planning) and the loop that forwards a stop to the workers must not wait
    on it: past the grace period the workers would be killed with their work uncommitted."""

    def __init__(self, watch: RunWatch, bar: bool, log: Any) -> None:
        super().__init__(daemon=True, name="progress")
        self.watch, self.bar, self.log = watch, bar, log
        self._finished = threading.Event()
        self._drawing = threading.Lock()  # a look still running at finish() must not draw after it
        self._ended = False

    def run(self) -> None:
        while not self._finished.wait(BAR_SECONDS if self.bar else PROGRESS_SECONDS):
            self._show(self._look())

    def finish(self, last_look: bool) -> None:
        """Stop; for a person, the bar's line is ended, with its final state unless the run
        was stopped (then the exit must not wait on a look). Nothing is shown after this."""
        self._finished.set()
        if last_look and self.bar:
            self.join()
            self._show(self._look())
        self.watch.close()  # a look still running stops reading
        with self._drawing:
            self._ended = True
            if self.bar:
                print(file=sys.stderr, flush=True)

    def _look(self) -> RunStatus | None:
        try:
            return self.watch.look()
        except Exception as exc:  # noqa: BLE001 - progress is for display: the next look may work
            if not self._finished.is_set():  # after finish(), close() cuts a look short
                self.log.warning("progress_unavailable", error=f"{type(exc).__name__}: {exc}")
            return None

    def _show(self, status: RunStatus | None) -> None:
        with self._drawing:
            if status is None or self._ended:
                return
            if self.bar:
                _show_bar(status)
            else:
                self.log.info("progress", **status.as_dict())


def _show_bar(status: RunStatus) -> None:
    """Redraw the progress bar in place (the line `virnucpro status` prints)."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns  # 0 on a terminal that never said
    except OSError:
        columns = 0
    width = (columns or 100) - 1
    print(f"\r{status.bar(width)}\x1b[K", end="", file=sys.stderr, flush=True)


def _tell(process: subprocess.Popen, line: str, last: bool = False) -> None:
    """Write one line on a worker's stdin (its spec, then the run id, the last word)."""
    stdin = process.stdin
    if stdin is None or stdin.closed:  # a worker that died at its spec hears nothing more
        return
    try:
        stdin.write(f"{line}\n".encode())
        stdin.flush()
        if last:
            stdin.close()
    except BrokenPipeError:  # it died already: the caller sees its exit code
        with contextlib.suppress(OSError):
            stdin.close()


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
