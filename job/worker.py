"""One worker process (`python -m job.worker SPEC`): claim shards, predict, commit parts.

A worker loads the models once, then takes shards until none is left: first those of its
slot, then any that are pending or whose lease expired. For each shard it skips the reads
already committed, predicts the rest, and every `checkpoint_seconds` writes a part under a
key only it uses and commits it into the shard's record by compare-and-swap. A background
thread renews the lease; when a renewal or commit is refused the shard was taken over and
the worker drops it without committing anything more.

SIGTERM/SIGINT (forwarded by the parent, or the parent's death) make it stop reading input,
finish the batch in flight, commit it as a last part, release its lease and exit 75.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice

import torch

from core.errors import ModelLoadError
from core.reads import Record
from core.pipeline import Predictor, ReadResult, load_predictor, resolve_device
from job import exit_codes
from job.config import RunConfig
from job.log import configure, get_logger
from job.parts import encode_features, encode_rows
from job.plan import Plan, load_plan, shard_records
from job.shards import Lease, Part, claim, read_shard
from job.store import Store, open_store

PROGRESS_SECONDS = 30.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the parent tells a worker: the run's config and its place among the workers."""

    config: RunConfig
    worker: int  # index among this machine's workers
    workers: int
    parent_pid: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        body = json.loads(text)
        config = body.pop("config")
        config["inputs"] = tuple(config["inputs"])
        return cls(config=RunConfig(**config), **body)


def command(spec: WorkerSpec) -> list[str]:
    """The argv that starts a worker for `spec`."""
    return [sys.executable, "-m", "job.worker", spec.to_json()]


def claim_order(shards: int, slot: int, slots: int, worker: int, workers: int) -> list[int]:
    """Shards in the order a worker tries them: its slot's share first, then the rest.

    A slot owns a contiguous range; the workers of a machine start at evenly spaced points
    of it so they rarely race for the same shard. Other slots' shards come last, from the
    far end, so a worker that helps out meets their owners as late as possible.
    """
    own = list(range(slot * shards // slots, (slot + 1) * shards // slots))
    offset = worker * len(own) // workers if own else 0
    mine = own[offset:] + own[:offset]
    return mine + [i for i in reversed(range(shards)) if not own or not own[0] <= i <= own[-1]]


class Worker:
    def __init__(
        self, spec: WorkerSpec, store: Store, plan: Plan, predictor: Predictor, device: str, stop: threading.Event
    ) -> None:
        self.spec, self.config, self.store, self.plan, self.stop = spec, spec.config, store, plan, stop
        self.predictor, self.device = predictor, device
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.log = get_logger(run_id=plan.run_id, worker=self.owner)

    def run(self) -> int:
        config = self.config
        warm_up_seconds = self.predictor.warm_up()
        self.log.info("engine_ready", **self.predictor.engine, warm_up_seconds=round(warm_up_seconds, 1))
        self.log.info("worker_started", device=self.device, slot=config.slot, slots=config.slots)
        order = claim_order(
            len(self.plan.shards), config.slot or 0, config.slots or 1, self.spec.worker, self.spec.workers
        )
        final: set[int] = set()
        poll = min(self.config.lease_seconds / 4, 5.0)
        while not self.stop.is_set():
            lease = self._next_lease(order, final)
            if lease is not None:
                self._process(lease)
            elif len(final) == len(order):
                self.log.info("worker_finished", **self._memory())
                return exit_codes.OK
            else:  # the rest is leased by others: wait for them to finish, or for a lease to expire
                self.stop.wait(poll)
        self.log.info("worker_stopped", **self._memory())
        return exit_codes.INTERRUPTED

    def _memory(self) -> dict[str, float]:
        """Peak GPU memory this worker allocated, for the log (nothing on the CPU)."""
        if not self.device.startswith("cuda"):
            return {}
        return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}

    def _next_lease(self, order: list[int], final: set[int]) -> Lease | None:
        for index in order:
            if self.stop.is_set():
                return None
            if index in final:
                continue
            state, _ = read_shard(self.store, index)
            if state.final:
                final.add(index)
                continue
            if state.leased(time.time()):
                continue
            lease = claim(
                self.store, index, self.owner, self.config.lease_seconds,
                self.config.max_attempts, self.device,
            )
            if lease is not None:
                return lease
        return None

    def _process(self, lease: Lease) -> None:
        shard = self.plan.shards[lease.state.index]
        log = self.log.bind(shard=shard.index, attempt=lease.state.attempt)
        skip = lease.state.reads_done
        log.info("shard_claimed", reads=shard.reads, committed=skip)
        renewer = _Renewer(lease, self.config.lease_seconds, skip, log)
        renewer.start()
        try:
            records = islice(shard_records(self.plan, shard, self.config.s3_endpoint_url), skip, None)
            self._predict_into(lease, records, renewer, log)
            if lease.lost.is_set():
                log.warning("lease_lost", message="another worker took this shard over; dropping it")
            elif lease.state.done:
                log.info("shard_done", reads=shard.reads)
            elif lease.release():
                log.info("shard_released", committed=lease.state.reads_done, reads=shard.reads)
        except Exception as exc:  # noqa: BLE001 - any failure of a shard is recorded on it
            error = f"{type(exc).__name__}: {exc}"
            log.error("shard_error", error=error, traceback=traceback.format_exc())
            if lease.fail(error, self.config.max_attempts) and lease.state.failed:
                log.error("shard_failed", attempts=len(lease.state.errors))
        finally:
            renewer.stop()

    def _predict_into(self, lease: Lease, records: Iterator[Record], renewer: _Renewer, log) -> None:  # noqa: ANN001
        """Score the records and commit parts at group boundaries only.

        The predictor forms groups of `group_reads` from the first record it is given, and a
        resumed shard starts at a commit, so it forms the same groups (and gets the same
        scores) as an uninterrupted one.
        """
        shard_reads = self.plan.shards[lease.state.index].reads
        buffer: list[ReadResult] = []
        started = time.monotonic()
        results = self.predictor.predict(records, with_features=self.config.write_features)
        try:
            for result in results:
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

    def _commit(self, lease: Lease, results: list[ReadResult], seconds: float, shard_reads: int, log) -> bool:  # noqa: ANN001
        state = lease.state
        stem = f"_run/parts/{state.index:05d}/{self.owner}-a{state.attempt}-{len(state.parts):04d}"
        rows, frames = encode_rows(results)
        self.store.put(f"{stem}.json", rows)
        features = None
        if self.config.write_features:
            features = f"{stem}.npy"
            self.store.put(features, encode_features(results))
        part = Part(f"{stem}.json", features, len(results), frames, round(seconds, 3), time.time(), self.device)
        if not lease.commit(part, self.config.lease_seconds, shard_reads):
            return False
        log.info(
            "part_committed", reads=len(results), frames=frames, committed=lease.state.reads_done,
            shard_reads=shard_reads, reads_per_s=round(len(results) / max(seconds, 1e-9), 1),
        )
        return True


class _Renewer(threading.Thread):
    """Renews a lease while its shard is being worked on; logs progress now and then."""

    def __init__(self, lease: Lease, lease_seconds: float, processed: int, log) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.lease, self.lease_seconds, self.processed, self.log = lease, lease_seconds, processed, log
        self._stopped = threading.Event()

    def run(self) -> None:
        interval = min(self.lease_seconds / 3, 10.0)
        last_log = time.monotonic()
        while not self._stopped.wait(interval):
            try:
                if not self.lease.renew(self.lease_seconds, self.processed):
                    return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried next interval
                self.log.warning("lease_renewal_failed", error=f"{type(exc).__name__}: {exc}")
            if time.monotonic() - last_log >= PROGRESS_SECONDS:
                last_log = time.monotonic()
                self.log.info("shard_progress", processed=self.processed, committed=self.lease.state.reads_done)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Stop when the parent dies (it was killed): a worker never outlives its job."""
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            stop.set()


def main(argv: list[str]) -> int:
    configure()
    spec = WorkerSpec.from_json(argv[0])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=_watch_parent, args=(spec.parent_pid, stop), daemon=True).start()
    store = open_store(spec.config.output, spec.config.s3_endpoint_url)
    plan = load_plan(store)
    if plan is None:
        get_logger().error("no_plan", output=spec.config.output)
        return exit_codes.INTERNAL_ERROR
    config = spec.config
    if config.device == "cpu":
        # One thread each: scores then do not depend on how many workers share the cores
        # (CPU kernels sum in a thread-count dependent order); --workers uses more cores.
        torch.set_num_threads(1)
    try:
        predictor = load_predictor(
            config.esm_model, config.dnabert_model, config.classifier, config.chunk_length,
            config.force_chunk_length, config.device, config.batch_tokens, config.compile,
        )
        predictor.group_reads = config.group_reads
        device = str(resolve_device(config.device))
    except (ModelLoadError, FileNotFoundError, ValueError) as exc:  # a model that cannot be loaded
        get_logger().error("models_not_loaded", error=str(exc))
        return exit_codes.BAD_INPUT
    return Worker(spec, store, plan, predictor, device, stop).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
