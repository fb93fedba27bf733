"""The merge: once every shard is final, one process turns the committed parts into the outputs.

The outputs are assembled in shard order and, within a shard, in read order, so their bytes
do not depend on how many workers ran or how often they were interrupted. The two largest
(reads.tsv, prediction_results.txt) stream to the store while they are written (on S3 a
multipart upload, invisible until completed); the others are written in a local temporary
directory and uploaded as each is complete, while the merge goes on (`_Uploads`). Every
output appears at its final key whole and at once, and `_SUCCESS` (or `_FAILED`, when
shards failed) is written after all of them: a run is finished exactly when one of the two
exists.

One process merges, chosen by the claim `_run/merge.json` (a lease, job/lease.py); it renews
that claim while it works and checks it, and that no marker exists yet, before each output
is made visible and before the marker. Should it die, another takes the claim over once it
expires. A second merge would produce the same bytes, so the claim saves work rather than guarding
correctness; the marker is written with a conditional create, so a stale merger can never
rewrite the marker of a finished run. After `_SUCCESS` the parts are deleted; after
`_FAILED` they are kept, so that `--retry-failed` reruns only the failed shards.
"""
from __future__ import annotations

import hashlib
import heapq
import importlib
import io
import json
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from isal import igzip

from core.outputs import HIGHEST_HEADER, PREDICTION_HEADER, READS_HEADER, ReadSummary, reads_line, viral_fasta
from job.errors import Interrupted, RunDamaged
from job.features import FeatureWriter
from job.lease import Claim, ExpiryObserver, Lease, Renewer
from job.lease import claim as take_claim
from job.log import get_logger
from job.parts import decode_features, decode_rows, lines, read_sources
from job.plan import INPUT_COPIES, Plan, shard_records
from job.shards import Part, ShardState, read_shard
from job.store import Store, Writer
from job.summary import RunStats

MERGE_KEY = "_run/merge.json"
PARTS_PREFIX = "_run/parts/"
SUCCESS = "_SUCCESS"
FAILED = "_FAILED"
PREDICTIONS = "prediction_results.txt"
HIGHEST = "prediction_results_highestscore.csv"
READS = "reads.tsv"
SUMMARY = "summary.tsv"
REPORT = "report.html"
VIRAL_READS = "viral_reads.fa.gz"
FEATURES = "features.h5"
DEMO_WARNING = "demo models in use: their scores are meaningless"
SHARD_FAILED = "shard_failed"  # reads.tsv reason of the reads a failed shard never scored
FETCH_THREADS = 8  # parts downloaded in parallel
PREFETCH_PARTS = 32  # parts fetched ahead of the one being written (bounds memory)
UPLOAD_THREADS = 4  # outputs uploaded at once, while the merge writes the next ones
RUN_ROWS = 1_000_000  # highest-score rows sorted in memory per run on disk (about 120 MB, twice that while sorting)
MAX_OPEN_RUNS = 256  # runs merged at once: up to 2.56 x 10^8 rows in one pass
RUN_BUFFER = 2**18  # read buffer of each run being merged (64 MiB for MAX_OPEN_RUNS)
WRITE_ROWS = 8192  # merged rows handed on at once


def read_marker(store: Store) -> tuple[str, dict] | None:
    """('_SUCCESS' or '_FAILED', its summary) once the run is finished, else None."""
    for name in (SUCCESS, FAILED):
        stored = store.get(name)
        if stored is not None:
            return name, json.loads(stored.data)
    return None


@dataclass(frozen=True)
class MergeInputs:
    """What the merge needs besides the store and the plan."""

    write_features: bool
    feature_dim: int  # DNA + protein embedding width (the classifier's input width)
    demo_models: bool
    endpoint_url: str | None
    lease_seconds: float
    gpu_hour_price: float | None = None  # for the report's cost line


class MergeClaim:
    """The right to merge: the plain claim `_run/merge.json` (job/lease.py), renewed while merging."""

    def __init__(self, store: Store, owner: str, lease_seconds: float, observer: ExpiryObserver | None = None) -> None:
        self.store, self.owner, self.lease_seconds = store, owner, lease_seconds
        self.observer = observer or ExpiryObserver()
        self.lease: Lease[Claim] | None = None

    def acquire(self) -> bool:
        self.lease = take_claim(self.store, MERGE_KEY, self.owner, self.lease_seconds, self.observer)
        return self.lease is not None

    def renew(self) -> bool:
        return self.lease is not None and self.lease.renew()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def merge(store: Store, plan: Plan, inputs: MergeInputs, claim: MergeClaim, stop: threading.Event) -> tuple[str, dict]:
    """Write the final outputs and the marker; returns the marker's name and body."""
    log = get_logger(run_id=plan.run_id)
    assert claim.lease is not None, "merge() needs an acquired MergeClaim"
    if (finished := read_marker(store)) is not None:  # finished while we took the claim
        return finished
    # The report's matplotlib: loaded already when this process ran the workers (job/batch.py);
    # else imported while the parts download (about a second), as the report needs it at the end
    threading.Thread(target=importlib.import_module, args=("job.report",), daemon=True).start()
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        states = list(pool.map(lambda shard: read_shard(store, shard.index)[0], plan.shards))
    assert plan.complete and all(state.final for state in states), "merge started before every shard was final"
    lister = ThreadPoolExecutor(1, thread_name_prefix="leftovers")
    with Renewer(claim.lease, log), tempfile.TemporaryDirectory(prefix="virnucpro-merge-") as tmp, lister:
        with _Uploads(store, Path(tmp), lambda: _check_still_merging(store, claim, stop), log) as uploads:
            summary, stats = _assemble(store, plan, states, inputs, Path(tmp), stop, uploads)
            # What _SUCCESS lets us delete is listed (in one listing) while the report renders:
            # the store has little else to do then, and listing 10^5 parts takes it seconds.
            leftovers = None if summary["failed_shards"] else lister.submit(
                lambda: [key for key in store.list("_run/") if key.startswith((PARTS_PREFIX, INPUT_COPIES))]
            )
            from job.report import render_report  # matplotlib: loaded by the merge only, not by `status` or the workers

            parts = [part for state in states for part in state.parts]
            (Path(tmp) / REPORT).write_text(render_report(summary, stats, parts, plan.created_at, inputs.gpu_hour_price))
            uploads.submit(REPORT)
            summary["files"] = uploads.described()
    _check_still_merging(store, claim, stop)
    if not claim.renew():
        raise Interrupted("lost the merge claim to another process; it finishes the run")
    marker = FAILED if summary["failed_shards"] else SUCCESS
    # Created, never overwritten: a stale merger cannot rewrite the marker of a finished run.
    if store.create(marker, json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n") is None:
        finished = read_marker(store)
        assert finished is not None
        return finished
    log.info("run_finished", marker=marker, reads=summary["reads"], frames=summary["frames"])
    if leftovers is not None:  # _SUCCESS; after _FAILED the parts stay, for --retry-failed
        store.delete(leftovers.result())
    return marker, summary


class _Uploads:
    """Each output stored as soon as it is complete, while the merge writes the next ones.

    The largest outputs are streamed to the store while they are written (`stream`: an S3
    multipart upload that no one sees before it is completed); the others are uploaded from
    the local directory. Either way an output becomes visible only after `check` (still the
    merger, not stopped, no marker yet), as before each upload of a sequential merge, and
    leaving the block waits for every output, so the marker, written after it, comes last.
    On an error, nothing more is made visible, streamed uploads are discarded, and the first
    error is raised.
    """

    def __init__(self, store: Store, directory: Path, check: Callable[[], None], log: Any) -> None:
        self.store, self.directory, self.check, self.log = store, directory, check, log
        self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload")
        self._done: dict[str, Future] = {}
        self._streams: list[_Streamed] = []

    def __enter__(self) -> _Uploads:
        return self

    def stream(self, name: str) -> _Streamed:
        """A text output sent to the store as it is written; `submit(name)` once it is complete."""
        output = _Streamed(self.store.writer(name))
        self._streams.append(output)
        return output

    def submit(self, name: str, streamed: _Streamed | None = None) -> None:
        self._done[name] = self._pool.submit(self._store, name, streamed)

    def _store(self, name: str, streamed: _Streamed | None) -> dict[str, object]:
        self.check()
        if streamed is not None:
            described = streamed.described()
            streamed.writer.commit()
            streamed.committed = True
        else:
            path = self.directory / name
            described = _describe(path)
            self.store.upload(name, str(path))
        self.log.info("output_written", file=name, **described)
        return described

    def described(self) -> dict[str, dict]:
        """Each output's size and sha256, once every upload is done (the first error raised)."""
        return {name: done.result() for name, done in self._done.items()}

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        for output in self._streams:
            if not output.committed:
                output.writer.abort()


class _Streamed:
    """An output going to a store `Writer`, with the size and sha256 the marker records.

    It is written a part's section at a time: hashlib releases the GIL for blocks over 2 KiB,
    so the hashing overlaps the threads that fetch parts and upload the output."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.committed = False
        self._digest = hashlib.sha256()
        self._bytes = 0

    def write(self, data: bytes) -> None:
        self._digest.update(data)
        self._bytes += len(data)
        self.writer.write(data)

    def described(self) -> dict[str, object]:
        return {"bytes": self._bytes, "sha256": self._digest.hexdigest()}


def _check_still_merging(store: Store, claim: MergeClaim, stop: threading.Event) -> None:
    """Stop before writing anything more when stopped, fenced, or the run got its marker."""
    if stop.is_set():
        raise Interrupted("stopped while uploading the outputs")
    if claim.lease is None or claim.lease.lost.is_set():
        raise Interrupted("lost the merge claim to another process; it finishes the run")
    if read_marker(store) is not None:
        raise Interrupted("another process finished the run meanwhile")


def _assemble(
    store: Store, plan: Plan, states: list[ShardState], inputs: MergeInputs, tmp: Path, stop: threading.Event,
    uploads: _Uploads,
) -> tuple[dict, RunStats]:
    """Write every output but the report (two streamed through `uploads`, the rest under `tmp`),
    handing each to `uploads` once complete; returns the marker's summary and the run's counts."""
    outcomes: Counter[str] = Counter()
    frames = 0
    features = _BlockedFeatures(str(tmp / FEATURES), inputs.feature_dim) if inputs.write_features else None
    highest = _SortedRuns(tmp / "runs")
    parts = [part for state in states for part in state.parts]
    fetched = _prefetch(store, parts, inputs.write_features)
    stats = RunStats([obj.uri for obj in plan.inputs], plan.settings["chunk_length"])
    predictions, reads = uploads.stream(PREDICTIONS), uploads.stream(READS)
    with ExitStack() as files:
        viral = files.enter_context(_viral_writer(tmp / VIRAL_READS)) if plan.settings.get("write_viral_reads") else None
        predictions.write(PREDICTION_HEADER.encode())
        reads.write(READS_HEADER.encode())
        for shard, state in zip(plan.shards, states):
            for part in state.parts:
                if stop.is_set():
                    raise Interrupted("stopped while merging")
                rows_data, features_data = next(fetched)
                rows = decode_rows(rows_data, part.rows)
                predictions.write(rows.predictions)
                reads.write(rows.reads)
                stats.add_counts(rows.counts)
                if viral is not None:
                    viral.writelines(viral_fasta(rows.viral or ()))
                highest.add(lines(rows.highest))
                outcomes.update(rows.outcomes)
                frames += rows.frames
                if features is not None and features_data is not None:
                    features.add(rows.frame_ids, decode_features(features_data))
            if state.failed:  # its reads that were never scored are still listed, with the reason
                unscored = islice(shard_records(plan, shard, inputs.endpoint_url, store), state.reads_done, None)
                sources = read_sources(plan, shard, state.reads_done, shard.reads - state.reads_done)
                for record, source in zip(unscored, sources):
                    line = reads_line(ReadSummary(record.id, len(record.sequence), 0, 0, None, "none", SHARD_FAILED), 0, source)
                    reads.write(line.encode())
                    stats.add_row(line)
                    outcomes[SHARD_FAILED] += 1
    if (listed := sum(outcomes.values())) != plan.total_reads:  # before any output is visible
        raise RunDamaged(
            f"the merge listed {listed} reads but the plan holds {plan.total_reads}: no output is "
            "written, so that no read goes missing silently (a bug, or objects of the run's _run/ "
            "deleted or edited); please report it"
        )
    uploads.submit(PREDICTIONS, predictions)
    uploads.submit(READS, reads)
    if viral is not None:
        uploads.submit(VIRAL_READS)
    if features is not None:
        features.close()
        uploads.submit(FEATURES)
    # Streamed too: written to a local file first, it needed as much disk again as the
    # sorted runs it is merged from (at 10^8 reads, 5.5 GB more in the pod's /tmp)
    merged = uploads.stream(HIGHEST)
    merged.write(HIGHEST_HEADER.encode())
    chunks = highest.write_merged(merged.write)
    uploads.submit(HIGHEST, merged)
    summary = {
        "run_id": plan.run_id,
        "reads": plan.total_reads,
        "reads_by_outcome": dict(sorted(outcomes.items())),
        "frames": frames,
        "chunks_called": chunks,
        "shards": len(plan.shards),
        "failed_shards": [
            {"shard": state.index, "reads": shard.reads, "attempts": state.attempt, "errors": list(state.errors)}
            for shard, state in zip(plan.shards, states) if state.failed
        ],
        "models": plan.settings,
        "wall_seconds": round(time.time() - plan.created_at, 3),
        "worker_seconds": round(sum(part.seconds for part in parts), 3),
        "gpu_seconds": round(sum(part.seconds for part in parts if part.device.startswith("cuda")), 3),
        "interruptions": sum(state.interruptions for state in states),
        "reads_redone": sum(state.redone_reads for state in states),
        "demo_models": inputs.demo_models,
        "min_virus_score": plan.settings.get("min_virus_score"),
        "virus_chunks": stats.total().virus_chunks,
    }
    if inputs.demo_models:
        summary["warning"] = DEMO_WARNING
    if plan.empty_inputs:
        summary["empty_inputs"] = list(plan.empty_inputs)
        summary["empty_inputs_warning"] = (
            f"{', '.join(plan.empty_inputs)} {'holds' if len(plan.empty_inputs) == 1 else 'hold'} no reads: "
            "check that the right files were given"
        )
    if (short := stats.short_reads_warning()) is not None:
        summary["short_reads_warning"] = short
        get_logger(run_id=plan.run_id).warning("short_reads", message=short)
    if (repeated := stats.duplicate_ids_warning()) is not None:
        summary["duplicate_ids_warning"] = repeated
        get_logger(run_id=plan.run_id).warning("duplicate_ids", message=repeated)
    (tmp / SUMMARY).write_text(stats.tsv())
    uploads.submit(SUMMARY)
    return summary, stats


@contextmanager
def _viral_writer(path: Path) -> Iterator[TextIO]:
    """viral_reads.fa.gz as text; no name or time in the gzip header, so the bytes depend on the reads only."""
    with open(path, "wb") as raw, igzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as text:
            yield text


def _prefetch(store: Store, parts: list[Part], with_features: bool) -> Iterator[tuple[bytes, bytes | None]]:
    """The parts' bytes in order, fetched PREFETCH_PARTS ahead by a pool of threads."""

    def fetch(part: Part) -> tuple[bytes, bytes | None]:
        features = _get(store, part.features) if with_features and part.features is not None else None
        return _get(store, part.rows), features

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        pending: deque[Future] = deque()
        for part in parts:
            pending.append(pool.submit(fetch, part))
            if len(pending) >= PREFETCH_PARTS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunk_id(line: bytes) -> bytes:
    """The sort key; UTF-8 bytes sort as their code points do, so the order is that of the text."""
    return line.split(b"\t", 1)[0]


class _SortedRuns:
    """The highest-score rows as sorted runs on local disk, merged k-way at the end.

    Rows are buffered up to RUN_ROWS, sorted and written as one run; at the end all runs
    are merged in one pass into the output stream, so memory holds one buffer whatever the
    number of reads and the local disk holds the rows once. Past MAX_OPEN_RUNS runs, passes
    first merge the oldest runs into one, just enough of them that the rest fit in the last
    pass: the disk then holds, besides the rows, the runs of one such pass. Chunk ids are
    unique in a run, so the merged order is the same as one sort of every row.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir()
        self.runs: list[Path] = []
        self._rows: list[bytes] = []

    def add(self, rows: list[bytes]) -> None:
        self._rows.extend(rows)
        if len(self._rows) >= RUN_ROWS:
            self._spill()

    def _spill(self) -> None:
        path = self.directory / f"{len(self.runs):06d}.txt"
        with open(path, "wb") as out:
            out.writelines(sorted(self._rows, key=_chunk_id))
        self.runs.append(path)
        self._rows = []

    def write_merged(self, write: Callable[[bytes], object]) -> int:
        """Write every row in chunk-id order, in blocks of WRITE_ROWS; returns the number of rows."""
        if self._rows or not self.runs:
            self._spill()
        runs, passes = self.runs, 0
        while len(runs) > MAX_OPEN_RUNS:
            taken = runs[: min(MAX_OPEN_RUNS, len(runs) - MAX_OPEN_RUNS + 1)]
            passes += 1
            path = self.directory / f"merged-{passes:06d}.txt"
            with open(path, "wb") as target:
                _merge_files(taken, target.write)
            for run in taken:
                run.unlink()
            runs = runs[len(taken):] + [path]
        return _merge_files(runs, write)


def _merge_files(paths: list[Path], write: Callable[[bytes], object]) -> int:
    with ExitStack() as stack:
        files = [stack.enter_context(open(path, "rb", buffering=RUN_BUFFER)) for path in paths]
        rows, block = 0, []
        for line in heapq.merge(*files, key=_chunk_id):
            block.append(line)
            if len(block) == WRITE_ROWS:  # a stream's write hashes and buffers: once a block, not a row
                write(b"".join(block))
                rows, block = rows + len(block), []
        write(b"".join(block))
    return rows + len(block)


class _BlockedFeatures:
    """features.h5 written in fixed blocks of rows: HDF5's file layout follows the sequence
    of writes, so equal blocks make the bytes depend on the content only, not on how the
    rows were split into parts."""

    BLOCK_ROWS = 4096

    def __init__(self, path: str, dim: int) -> None:
        self._writer = FeatureWriter(path, dim)
        self._ids: list[str] = []
        self._rows: list[np.ndarray] = []

    def add(self, frame_ids: list[str], features: np.ndarray) -> None:
        self._ids.extend(frame_ids)
        self._rows.append(features)
        if len(self._ids) >= self.BLOCK_ROWS:
            matrix = np.concatenate(self._rows)
            whole = len(self._ids) - len(self._ids) % self.BLOCK_ROWS
            for start in range(0, whole, self.BLOCK_ROWS):
                self._writer.append(self._ids[start:start + self.BLOCK_ROWS], matrix[start:start + self.BLOCK_ROWS])
            self._ids, self._rows = self._ids[whole:], [matrix[whole:]]

    def close(self) -> None:
        if self._ids:
            self._writer.append(self._ids, np.concatenate(self._rows))
        self._writer.close()


def _get(store: Store, key: str) -> bytes:
    stored = store.get(key)
    if stored is None:
        raise RunDamaged(f"committed part {store.uri}/{key} is missing (deleted by hand?); no output is written")
    return stored.data


def _describe(path: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * 2**20):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
