"""One worker process (`python -m job.worker`): claim shards, predict, commit parts.

A worker loads the models once, then takes shards until none is left: first those of its
slot, then any that are pending or whose lease expired. For each shard it skips the reads
already committed, predicts the rest, and every `checkpoint_seconds` writes a part under a
key only it uses and commits it into the shard's record by compare-and-swap. A background
thread renews the lease; when a renewal or commit is refused the shard was taken over and
the worker drops it without committing anything more.

SIGTERM/SIGINT (forwarded by the parent) or the parent's death make it stop reading input,
finish the group in flight, commit it as a last part, release its lease and exit 75. A group
can take minutes on a CPU, longer than `--grace-seconds`: shortly before the grace period
ends (`GRACE_SHARE` of it) the worker releases its lease itself and exits 75 at once; the
unfinished group is redone later from the last committed part. A stop is never an error: it
does not count towards `--max-attempts`. The handlers are installed before torch is
imported or a model loaded; a stop during the warm-up ends it between two batch shapes and
the worker exits 75 without claiming a shard. A full local disk exits 75, a read-only one
65, in one line.

The parent starts its workers before it has settled the plan, so that they import torch,
load the models and compile while it checks the models and writes or adopts the plan. A
worker touches no plan until the parent names the run (one line on its stdin): the output
may hold another run's plan that the parent is about to refuse. Its stdin carries two lines:
the `WorkerSpec` at once, the run id later. The spec does not go in argv, where `ps` would
show the endpoint URL with any credentials in it and a long input list would pass Linux's
128 KiB limit on one argument. A worker told nothing (the parent stopped it, or closed its
stdin) exits 75; a model it cannot load before that is
reported only if the parent goes on (the parent's own checks report it otherwise, once).

Start-up, timed in the log for the cold-start benchmark: `compiler_artifacts_loaded` (what
earlier workers compiled, handed to torch in DNABERT-S's loading thread before anything
compiles, while ESM-2's weights load in the other), `models_loaded` (torch import, the two
encoders loaded at once, on a GPU from their converted weights in the model cache, read
ahead while torch is imported), `warm_up_started` and `engine_ready` (compiling),
`worker_started` (the run named), `first_batch_scored`.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import without_unsafe_advice
from job import exit_codes
from job.config import RunConfig
from job.errors import BadInput, disk_error_code, disk_error_message, user_error_code
from job.lease import ExpiryObserver, Renewer
from job.log import configure, get_logger, redact
from job.signals import stop_on_signals
from job.models import compiler_cache_dir, read_ahead, weights_cache
from job.parts import PART_SUFFIX, encode_features, encode_rows, read_sources
from job.plan import Plan, load_plan, shard_records
from job.shards import Part, ShardLease, claim, read_shard, shard_key
from job.store import Store, open_store

if TYPE_CHECKING:  # torch is imported by main() once the signal handlers are in place
    import torch

    from core.reads import Record
    from core.pipeline import Predictor, ReadResult
    from job.model_cache import WeightsCache

PROGRESS_SECONDS = 30.0
PLAN_POLL_SECONDS = 0.5  # how often a worker with nothing to do looks for newly published shards
GRACE_SHARE = 0.8  # of --grace-seconds: when a stopping worker gives its lease back and exits


@dataclass(frozen=True)
class WorkerSpec:
    """What the parent tells a worker: the run's config and its place among the workers."""

    config: RunConfig
    worker: int  # index among this machine's workers
    workers: int
    parent_pid: int
    # Each model's identity as the plan records it (job.models.LocalModel.identity): the key
    # of its converted weights, given here since the models load before the plan is settled
    models: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def to_json(self) -> str:
        """One line: the first a worker reads on its stdin."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        body = json.loads(text)
        config = body.pop("config")
        config["inputs"] = tuple(config["inputs"])
        return cls(config=RunConfig(**config), **body)


def command() -> list[str]:
    """The argv that starts a worker; its spec follows on stdin (`WorkerSpec.to_json`)."""
    # -P: nothing is imported from the directory the job was started in (a stray
    # `concurrent.py` there would run inside the worker); PYTHONPATH still applies.
    return [sys.executable, "-P", "-m", "job.worker"]


def claim_order(shards: int, slot: int, slots: int, worker: int, workers: int) -> list[int]:
    """The published shards 0 .. `shards` - 1 in the order a worker tries them.

    Shards are dealt round-robin, so the order needs no final count and the first shards
    published go to every worker at once: shard i belongs to slot i % slots, and within a
    slot to worker (i // slots) % workers. A worker tries its own shards first, then its
    slot's others, then other slots' shards from the far end, so that a worker helping out
    meets their owners as late as possible.
    """
    own: list[int] = []
    slot_rest: list[int] = []
    others: list[int] = []
    for index in range(shards):
        if index % slots != slot:
            others.append(index)
        elif (index // slots) % workers == worker:
            own.append(index)
        else:
            slot_rest.append(index)
    return own + slot_rest + others[::-1]


def owner_prefix(pid: int) -> str:
    """How the owner ids of the worker with this pid on this machine begin."""
    return f"{socket.gethostname()}-{pid}-"


class Worker:
    def __init__(
        self,
        spec: WorkerSpec,
        store: Store,
        plan: Plan,
        predictor: Predictor,
        device: str,
        stop: threading.Event,
    ) -> None:
        self.spec, self.config, self.store, self.plan, self.stop = spec, spec.config, store, plan, stop
        self.predictor, self.device = predictor, device
        self.observer = ExpiryObserver()
        self.owner = f"{owner_prefix(os.getpid())}{uuid.uuid4().hex[:6]}"
        self.log = get_logger(run_id=plan.run_id, worker=self.owner)
        self.current: ShardLease | None = None  # the lease held now, for stop_now()
        self.renewer: _ShardRenewer | None = None  # its renewer: the reads scored so far
        self.writing = threading.Lock()  # held while a part is written and committed
        self.sequences: deque[str] = deque()  # with --write-viral-reads: letters of the reads scored, not yet committed
        self.scored = False  # whether any read was scored yet (the first is logged)

    def run(self) -> int:
        config = self.config
        self.log.info("worker_started", device=self.device, slot=config.slot, slots=config.slots)
        final: set[int] = set()
        poll = min(self.config.lease_seconds / 4, 5.0)
        waiting = False
        while not self.stop.is_set():
            self.plan = load_plan(self.store, self.plan) or self.plan  # shards published since
            if self.plan.error:
                self.log.info("plan_failed", error=self.plan.error)  # the parent reports it, once
                return exit_codes.BAD_INPUT
            order = claim_order(
                len(self.plan.shards), config.slot or 0, config.slots or 1, self.spec.worker, self.spec.workers
            )
            lease = self._next_lease(order, final)
            if lease is not None:
                waiting = False
                try:
                    self._process(lease)
                except BadInput as exc:  # the input changed under the run: stop, nothing more is right
                    self.log.error("bad_input", error=str(exc))
                    print(f"virnucpro: error: {redact(str(exc))}", file=sys.stderr)
                    return exit_codes.BAD_INPUT
            elif self.plan.complete and len(final) == len(order):
                self.log.info("worker_finished", **self._memory())
                return exit_codes.OK
            elif not self.plan.complete:  # every published shard is taken: wait for the planner
                if not waiting:
                    self.log.info("waiting_for_plan", published=len(order), final=len(final))
                    waiting = True
                self.stop.wait(PLAN_POLL_SECONDS)
            else:  # the rest is leased by others: wait for them to finish, or for a lease to expire
                self._log_waiting(order, final)
                self.stop.wait(poll)
        self.log.info("worker_stopped", **self._memory())
        return exit_codes.INTERRUPTED

    def _memory(self) -> dict[str, float]:
        """Peak GPU memory this worker allocated, for the log (nothing on the CPU)."""
        if not self.device.startswith("cuda"):
            return {}
        import torch

        return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}

    def _next_lease(self, order: list[int], final: set[int]) -> ShardLease | None:
        for index in order:
            if self.stop.is_set():
                return None
            if index in final:
                continue
            state, etag = read_shard(self.store, index)
            if state.final:
                final.add(index)
                continue
            if self.observer.see(shard_key(index), etag, state.owner, state.lease_seconds) > 0:
                continue  # held by someone else, who renewed it lately
            lease = claim(self.store, index, self.owner, self.config.lease_seconds, self.device, self.observer)
            if lease is not None and self.stop.is_set():  # stopped while claiming: give it straight back
                _release_quietly(lease)
                return None
            if lease is not None:
                return lease
        return None

    def _log_waiting(self, order: list[int], final: set[int]) -> None:
        """Say which lease this worker waits for and how long at most (the soonest to expire)."""
        held = [shard_key(index) for index in order if index not in final]
        key = min(held, key=self.observer.remaining, default=None)
        if key is not None and self.observer.holder(key) is not None:
            self.observer.log_waiting(self.log, "waiting_for_lease", key, shard=int(key[-10:-5]))

    def _process(self, lease: ShardLease) -> None:
        shard = self.plan.shards[lease.state.index]
        log = self.log.bind(shard=shard.index, attempt=lease.state.attempt)
        skip = lease.state.reads_done
        log.info("shard_claimed", reads=shard.reads, committed=skip)
        renewer = _ShardRenewer(lease, skip, log)
        self.current, self.renewer = lease, renewer
        renewer.start()
        try:
            records = iter(shard_records(self.plan, shard, self.config.s3_endpoint_url, self.store))
            earlier = islice(records, skip)  # read first, by the predictor (its memo of sequences)
            self.sequences.clear()
            if self.plan.settings.get("write_viral_reads"):
                records = _remembered(records, self.sequences)
            self._predict_into(lease, earlier, records, renewer, log)
            if lease.lost.is_set():
                log.warning("lease_lost", message="another worker took this shard over; dropping it")
            elif lease.state.done:
                log.info("shard_done", reads=shard.reads)
            elif lease.release(renewer.processed):
                log.info("shard_released", committed=lease.state.reads_done, reads=shard.reads)
        except BadInput:  # not the shard's fault: give it back and stop
            lease.release()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a shard is recorded on it
            if disk_error_code(exc) is not None:  # this machine's fault, not the shard's
                _release_quietly(lease)
                raise
            error = f"{type(exc).__name__}: {without_unsafe_advice(str(exc))}"
            log.error("shard_error", error=error, traceback=traceback.format_exc())
            if lease.fail(error, self.config.max_attempts) and lease.state.failed:
                log.error("shard_failed", attempts=len(lease.state.errors))
        finally:
            renewer.stop()
            self.current = self.renewer = None

    def stop_now(self) -> None:
        """Give back the lease held now, without waiting for the group in flight (the grace
        period is ending); the caller then exits. A part being written is finished first."""
        acquired = self.writing.acquire(timeout=max(1.0, self.config.grace_seconds * (1 - GRACE_SHARE) / 2))
        lease, renewer = self.current, self.renewer
        if lease is not None and not lease.released and not lease.lost.is_set() and _release_quietly(
            lease, renewer.processed if renewer is not None else 0
        ):
            self.log.warning(
                "shard_released", shard=lease.state.index, committed=lease.state.reads_done,
                message="stopped within the grace period; the unfinished group is redone later",
            )
        if acquired:
            self.writing.release()

    def _predict_into(
        self, lease: ShardLease, earlier: Iterator[Record], records: Iterator[Record], renewer: _ShardRenewer, log,  # noqa: ANN001
    ) -> None:
        """Score the records and commit parts at group boundaries only.

        The predictor forms groups of `group_reads` from the first record it is given, and a
        resumed shard starts at a commit, so it forms the same groups (and gets the same
        scores) as an uninterrupted one. It is given the committed reads (`earlier`) too, not
        to score them but so that its memo of embedded sequences knows them: see `Predictor`
        for what a resume can change in the last digits on a GPU.
        """
        shard_reads = self.plan.shards[lease.state.index].reads
        buffer: list[ReadResult] = []
        started = time.monotonic()
        results = self.predictor.predict(records, with_features=self.config.write_features, earlier=earlier)
        try:
            for result in results:
                if not self.scored:
                    self.scored = True
                    log.info("first_batch_scored")  # the cold start ends here (benchmarks/full_size_run.py)
                buffer.append(result)
                renewer.processed += 1
                if lease.lost.is_set():
                    return
                due = self.stop.is_set() or time.monotonic() - started >= self.config.checkpoint_seconds
                if due and len(buffer) % self.config.group_reads == 0:
                    if not self._commit(lease, buffer, time.monotonic() - started, shard_reads, log):
                        return
                    if self.stop.is_set():
                        return
                    buffer, started = [], time.monotonic()
            if buffer and not lease.lost.is_set():
                self._commit(lease, buffer, time.monotonic() - started, shard_reads, log)
        finally:
            results.close()

    def _commit(self, lease: ShardLease, results: list[ReadResult], seconds: float, shard_reads: int, log) -> bool:  # noqa: ANN001
        with self.writing:
            return self._commit_locked(lease, results, seconds, shard_reads, log)

    def _commit_locked(self, lease: ShardLease, results: list[ReadResult], seconds: float, shard_reads: int, log) -> bool:  # noqa: ANN001
        state = lease.state
        stem = f"_run/parts/{state.index:05d}/{self.owner}-a{state.attempt}-{len(state.parts):04d}"
        sequences = [self.sequences.popleft() for _ in results] if self.plan.settings.get("write_viral_reads") else None
        sources = read_sources(self.plan, self.plan.shards[state.index], state.reads_done, len(results))
        settings = self.plan.settings
        rows, frames = encode_rows(results, sources, settings["chunk_length"], settings.get("min_virus_score"), sequences)
        # Written only while the lease is still ours (renewed just now), and deleted again if
        # the commit is refused: a worker that lost its shard leaves no part behind.
        if not lease.renew(max(lease.state.processed, lease.state.reads_done + len(results))):
            return False
        keys = [f"{stem}{PART_SUFFIX}"]
        self.store.put(keys[0], rows)
        features = None
        if self.config.write_features:
            features = f"{stem}.npy"
            keys.append(features)
            self.store.put(features, encode_features(results))
        part = Part(keys[0], features, len(results), frames, round(seconds, 3), time.time(), self.device)
        if not lease.commit(part, shard_reads):
            self.store.delete(keys)
            return False
        log.info(
            "part_committed", reads=len(results), frames=frames, committed=lease.state.reads_done,
            shard_reads=shard_reads, reads_per_s=round(len(results) / max(seconds, 1e-9), 1),
        )
        return True


class _ShardRenewer(Renewer):
    """Renews a shard's lease with the reads processed so far; logs progress now and then."""

    def __init__(self, lease: ShardLease, processed: int, log) -> None:  # noqa: ANN001
        super().__init__(lease, log)
        self.processed = processed
        self._last_log = time.monotonic()

    def changes(self) -> dict[str, object]:
        return {"processed": self.processed}

    def renewed(self) -> None:
        if time.monotonic() - self._last_log >= PROGRESS_SECONDS:
            self._last_log = time.monotonic()
            self.log.info("shard_progress", processed=self.processed, committed=self.lease.state.reads_done)


def _remembered(records: Iterator[Record], sequences: deque[str]) -> Iterator[Record]:
    """The records, their letters kept in `sequences` as the predictor takes them (it yields
    one result per record, in order, so the commit pops one per result)."""
    for record in records:
        sequences.append(record.sequence)
        yield record


def _release_quietly(lease: ShardLease, processed: int = 0) -> bool:
    """Whether the shard was given back; a failure is logged (the lease then expires)."""
    try:
        return lease.release(processed)
    except Exception as exc:  # noqa: BLE001 - it then expires; the stop goes on
        get_logger().warning("lease_release_failed", shard=lease.state.index, error=f"{type(exc).__name__}: {exc}")
        return False


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Stop when the parent dies (it was killed): a worker never outlives its job."""
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            get_logger().warning("parent_gone", message="the job that started this worker is gone; stopping")
            stop.set()


def _exit_within_grace(stop: threading.Event, grace_seconds: float, worker: list[Worker]) -> None:
    """Once stopped, give the lease back and exit 75 before the grace period ends, whatever
    the main thread is busy with (a group of reads, a model load)."""
    stop.wait()
    time.sleep(grace_seconds * GRACE_SHARE)
    if worker:
        worker[0].stop_now()
    get_logger().warning("worker_stopped", message="stopped within the grace period")
    os._exit(exit_codes.INTERRUPTED)


def main() -> int:
    stop = threading.Event()
    stop_on_signals(stop)  # first: a stop during start-up exits 75 too
    line = sys.stdin.readline()  # the parent writes it right after starting us
    if not line.endswith("\n"):  # the parent died first, or while writing it
        return exit_codes.INTERRUPTED
    spec = WorkerSpec.from_json(line)
    config = spec.config
    configure(config.log_format)
    started: list[Worker] = []
    threading.Thread(target=_watch_parent, args=(spec.parent_pid, stop), daemon=True).start()
    threading.Thread(target=_exit_within_grace, args=(stop, config.grace_seconds, started), daemon=True).start()
    try:
        return _work(spec, stop, started)
    except Exception as exc:
        code = disk_error_code(exc) or user_error_code(exc)
        if code is None:
            raise
        message = disk_error_message(exc) if disk_error_code(exc) else without_unsafe_advice(str(exc))  # type: ignore[arg-type]
        get_logger().error("worker_error", error=message, exit_code=code)
        print(f"virnucpro: error: {message}", file=sys.stderr, flush=True)
        return code


def _work(spec: WorkerSpec, stop: threading.Event, started: list[Worker]) -> int:
    config = spec.config
    store = open_store(config.output, config.s3_endpoint_url)
    if stop.is_set():
        return exit_codes.INTERRUPTED
    log = get_logger(pid=os.getpid())
    try:
        predictor, device, caches, compiler = _load(spec, log, stop)
    except Exception as exc:
        # A model the parent's checks refuse too: the parent reports it, once, and stops us
        if user_error_code(exc) is not None and _run_named_by_parent(stop) is None:
            return exit_codes.INTERRUPTED
        raise
    if stop.is_set():
        return exit_codes.INTERRUPTED
    warm_up_seconds, compiler_cache = _warm_up(predictor, compiler, stop, log)
    if stop.is_set():  # before any claim: a stop during the warm-up takes no lease
        log.info("worker_stopped", message="stopped during the warm-up; no shard was claimed")
        return exit_codes.INTERRUPTED
    log.info("engine_ready", **predictor.engine, warm_up_seconds=round(warm_up_seconds, 1), compiler_cache=compiler_cache)
    run_id = _run_named_by_parent(stop)
    if run_id is None:
        log.info("worker_stopped", message="stopped before the parent named the run; no shard was claimed")
        return exit_codes.INTERRUPTED
    plan = load_plan(store)
    if plan is None or plan.run_id != run_id:
        log.error("no_plan", output=config.output, run_id=run_id)
        return exit_codes.INTERNAL_ERROR
    worker = Worker(spec, store, plan, predictor, device, stop)
    started.append(worker)
    code = worker.run()
    if code == exit_codes.OK and any(caches.values()):
        from job.model_cache import finish_writes

        finish_writes()  # converted weights still being written: the next start wants them whole
    return code


def _load(spec: WorkerSpec, log: Any, stop: threading.Event
          ) -> tuple[Predictor, str, dict[str, WeightsCache | None], CompilerCache | None]:
    """Import torch and load the models (timed in the log): the predictor, its device, the
    encoders' converted-weights caches and the compiler's artifacts handed to torch.
    DNABERT-S is warmed up while ESM-2's weights load (until `stop`)."""
    config = spec.config
    if config.device != "cpu":  # converted weights are kept for a GPU only (below)
        read_ahead(config.model_cache, [spec.models.get(name, {}) for name in ("esm_model", "dnabert_model")])
    began = time.perf_counter()
    import torch

    from core.pipeline import load_predictor, resolve_device

    imported = time.perf_counter()
    if config.device == "cpu":
        # One thread each: scores then do not depend on how many workers share the cores
        # (CPU kernels may sum in a thread-count dependent order); --workers uses more cores.
        torch.set_num_threads(1)
    target = resolve_device(config.device)
    # Converted weights are kept for a GPU only: there they are float16, half the source's
    # size and no conversion; on the CPU they would be a second float32 copy of the source.
    caches = {name: weights_cache(config.model_cache, spec.models.get(name)) if target.type == "cuda" else None
              for name in ("esm_model", "dnabert_model")}
    compiler: list[CompilerCache | None] = []  # loaded while ESM-2's weights load (core.pipeline)
    predictor = load_predictor(
        config.esm_model, config.dnabert_model, config.classifier, config.chunk_length,
        config.force_chunk_length, config.device, config.batch_tokens, config.compile, config.group_reads,
        config.reuse, esm_cache=caches["esm_model"], dnabert_cache=caches["dnabert_model"],
        before_compiling=lambda: compiler.append(CompilerCache.load(spec, target, log)), warm_up=True, stop=stop,
    )
    log.info(
        "models_loaded", import_seconds=round(imported - began, 2), load_seconds=round(time.perf_counter() - imported, 2),
        esm=predictor.esm.loaded_from, dnabert=predictor.dnabert.loaded_from,
    )
    return predictor, str(target), caches, compiler[0]


@dataclass(frozen=True)
class CompilerCache:
    """The compiler's artifacts saved by an earlier worker (job.model_cache), handed to torch
    before anything compiles: the attention backend's check compiles already while the
    encoders load, the warm-up after. Keyed by torch, Triton, the GPU, the models and the
    requested token budget, all known before the models load."""

    path: Path
    status: str  # what loading them did: 'loaded', 'missing', 'refused: why'
    loaded: set[str]

    @classmethod
    def load(cls, spec: WorkerSpec, device: torch.device, log: Any) -> CompilerCache | None:
        """None when the engine runs eagerly: nothing to compile."""
        from core.engine import compiles
        from job.model_cache import compiler_artifacts_path, compiler_key, load_compiler_artifacts

        config = spec.config
        if not compiles(config.compile, device):
            return None
        engine = {"models": {name: spec.models.get(name) for name in ("esm_model", "dnabert_model")},
                  "batch_tokens": config.batch_tokens}
        key = compiler_key(engine, device)
        path = compiler_artifacts_path(compiler_cache_dir(config.model_cache), key)
        status, loaded = load_compiler_artifacts(path)
        log.info("compiler_artifacts_loaded", compiler_cache=status, key=key)
        return cls(path, status, loaded)

    def save(self) -> str:
        """What saving this process's artifacts did, after the load's: e.g. 'loaded, unchanged'."""
        from job.model_cache import save_compiler_artifacts

        return f"{self.status}, {save_compiler_artifacts(self.path, self.loaded)}"


def _warm_up(predictor: Predictor, compiler: CompilerCache | None, stop: threading.Event, log: Any) -> tuple[float, str]:
    """Compile the engine for every batch shape, stopping between shapes on a stop: the
    seconds it took, and what the compiler's artifact cache did (saved afterwards when this
    warm-up compiled more than it loaded)."""
    if compiler is None or not predictor.compiled:
        return predictor.warm_up(stop), "not compiled"
    log.info("warm_up_started", compiler_cache=compiler.status)
    seconds = predictor.warm_up(stop)
    if stop.is_set():
        return seconds, compiler.status
    return seconds, compiler.save()


def _run_named_by_parent(stop: threading.Event) -> str | None:
    """The run id the parent writes on our stdin once it has settled the plan; None when
    stopped first, or when the parent closed stdin without naming one."""
    told: list[str] = []
    answered = threading.Event()

    def read() -> None:
        told.append(sys.stdin.readline().strip())
        answered.set()

    threading.Thread(target=read, daemon=True, name="parent-word").start()
    while not answered.wait(0.1):
        if stop.is_set():
            return None
    return told[0] or None


if __name__ == "__main__":
    sys.exit(main())
