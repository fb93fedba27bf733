"""Worker and merge in one process with a fake predictor: claims, parts, failures, _FAILED."""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from core.fasta import Record
from core.outputs import FrameScore, ReadSummary
from core.pipeline import ReadResult
from job.config import RunConfig
from job.inputs import resolve_inputs
from job.merge import FAILED, SUCCESS, MergeClaim, MergeInputs, merge, read_marker
from job.plan import plan_run
from job.shards import read_shard
from job.store import LocalStore
from job.worker import Worker, WorkerSpec, claim_order

DIM = 4


class FakePredictor:
    """Scores from a hash of the read id; raises on reads named in `poison`."""

    engine = {"device": "cpu"}

    def __init__(self, group_reads: int, poison: Iterable[str] = ()) -> None:
        self.group_reads = group_reads
        self.poison = set(poison)
        self.group_sizes: list[int] = []

    def warm_up(self) -> float:
        return 0.0

    def predict(self, records: Iterable[Record], with_features: bool = False) -> Iterator[ReadResult]:
        records = iter(records)
        while group := list(islice(records, self.group_reads)):
            self.group_sizes.append(len(group))
            yield from self._score(group, with_features)

    def _score(self, records: list[Record], with_features: bool) -> Iterator[ReadResult]:
        for record in records:
            if record.id in self.poison:
                raise RuntimeError(f"cannot score {record.id}")
            if record.status is not None:
                summary = ReadSummary(record.id, len(record.sequence), 0, 0, None, "none", record.status)
                yield ReadResult(summary, [], np.zeros((0, DIM), np.float32) if with_features else None)
                continue
            virus = np.float32(int(hashlib.sha256(record.id.encode()).hexdigest()[:4], 16) / 65535)
            frames = [FrameScore(f"{record.id}_chunk_1F1", np.float32(1) - virus, virus)]
            call = "virus" if virus >= np.float32(1) - virus else "others"
            summary = ReadSummary(record.id, len(record.sequence), 1, 1, virus, call, "")
            features = np.full((1, DIM), virus, np.float32) if with_features else None
            yield ReadResult(summary, frames, features)


def make_run(tmp_path: Path, reads: int, **config: object) -> tuple[RunConfig, LocalStore]:
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">r{i:03d}\nACGTACGT\n" for i in range(reads)) + ">r001\nACGT\n")
    run = RunConfig(
        inputs=(str(fasta),), output=str(tmp_path / "out"), esm_model="-", dnabert_model="-",
        classifier="-", **config,  # type: ignore[arg-type]
    )
    store = LocalStore(run.output)
    plan_run(store, resolve_inputs(run.inputs, None), {"x": 1}, run.shard_reads, None, threading.Event())
    return run, store


def work(run: RunConfig, store: LocalStore, predictor: FakePredictor, worker: int = 0, workers: int = 1) -> int:
    from job.plan import load_plan

    spec = WorkerSpec(run, worker, workers, 0)
    return Worker(spec, store, load_plan(store), predictor, "cpu", threading.Event()).run()  # type: ignore[arg-type]


def finish(run: RunConfig, store: LocalStore) -> tuple[str, dict]:
    from job.plan import load_plan

    inputs = MergeInputs(run.write_features, DIM, True, None, 30.0)
    claim = MergeClaim(store, "test", 30.0)
    assert claim.acquire()
    return merge(store, load_plan(store), inputs, claim, threading.Event())


def test_claim_order_prefers_own_slot() -> None:
    assert claim_order(10, 0, 2, 0, 1) == [0, 1, 2, 3, 4, 9, 8, 7, 6, 5]
    assert claim_order(10, 1, 2, 1, 2) == [7, 8, 9, 5, 6, 4, 3, 2, 1, 0]
    assert claim_order(3, 0, 1, 1, 2) == [1, 2, 0]
    assert sorted(claim_order(2, 3, 4, 0, 1)) == [0, 1]  # more slots than shards


def test_parts_at_group_boundaries_and_merge(tmp_path: Path) -> None:
    run, store = make_run(tmp_path, 25, shard_reads=10, group_reads=3, checkpoint_seconds=0.0, write_features=True)
    predictor = FakePredictor(3)
    assert work(run, store, predictor) == 0
    assert predictor.group_sizes == [3, 3, 3, 1] * 2 + [3, 3]  # groups restart at each shard
    state, _ = read_shard(store, 0)
    assert [p.reads for p in state.parts] == [3, 3, 3, 1] and state.done and state.attempt == 1
    marker, summary = finish(run, store)
    assert marker == SUCCESS and summary["reads"] == 26
    out = Path(run.output)
    reads = (out / "reads.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in reads[1:]] == [f"r{i:03d}" for i in range(25)] + ["r001"]
    assert reads[-1].endswith("none\tduplicate_id")
    highest = (out / "prediction_results_highestscore.csv").read_text().splitlines()
    assert highest[1:] == sorted(highest[1:])
    assert json.loads((out / "_SUCCESS").read_text())["files"]["features.h5"]["bytes"] > 0
    assert store.list("_run/parts/") == []  # cleaned up after the marker


def test_a_shard_that_keeps_failing_is_reported(tmp_path: Path) -> None:
    run, store = make_run(tmp_path, 30, shard_reads=10, group_reads=2, checkpoint_seconds=0.0, max_attempts=2)
    assert work(run, store, FakePredictor(2, poison={"r015"})) == 0
    state, _ = read_shard(store, 1)
    assert state.failed and state.reads_done == 4 and state.errors == ("RuntimeError: cannot score r015",) * 2
    marker, summary = finish(run, store)
    assert marker == FAILED and read_marker(store)[0] == FAILED
    assert summary["failed_shards"][0]["shard"] == 1
    assert summary["reads_by_outcome"]["shard_failed"] == 6
    reads = (Path(run.output) / "reads.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[0] for line in reads] == [f"r{i:03d}" for i in range(30)] + ["r001"]
    assert reads[15].split("\t")[5:] == ["none", "shard_failed"]


def test_two_workers_share_without_overlap(tmp_path: Path) -> None:
    run, store = make_run(tmp_path, 60, shard_reads=5, group_reads=5, checkpoint_seconds=0.0)
    codes: list[int] = []
    threads = [threading.Thread(target=lambda w=w: codes.append(work(run, store, FakePredictor(5), w, 2))) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [0, 0]
    states = [read_shard(store, i)[0] for i in range(13)]
    assert all(s.done and s.attempt == 1 for s in states)
    assert len({s.parts[0].rows.split("/")[-1].split("-a")[0] for s in states}) == 2  # both worked
