"""Worker and merge in one process with a fake predictor: claims, parts, failures, _FAILED."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from core.reads import Record
from core.outputs import FrameScore, ReadSummary
from core.pipeline import ReadResult
from job import exit_codes
from job.config import RunConfig
from job.errors import BadInput
from job.inputs import resolve_inputs
from job.lease import ExpiryObserver
from job.merge import FAILED, SUCCESS, MergeClaim, MergeInputs, merge, read_marker
from job.parts import decode_rows, lines
from job.plan import plan_run
from job.shards import claim, read_shard
from job.store import LocalStore
from job.worker import Worker, WorkerSpec, claim_order

DIM = 4


class FakePredictor:
    """Scores from a hash of the read id; raises on reads named in `poison`."""

    engine = {"device": "cpu"}
    compiled = False

    def __init__(self, group_reads: int, poison: Iterable[str] = ()) -> None:
        self.group_reads = group_reads
        self.poison = set(poison)
        self.group_sizes: list[int] = []
        self.earlier: list[list[str]] = []  # each call's `earlier` reads

    def warm_up(self, stop: threading.Event | None = None) -> float:
        return 0.0

    def predict(
        self, records: Iterable[Record], with_features: bool = False, earlier: Iterable[Record] = ()
    ) -> Iterator[ReadResult]:
        self.earlier.append([record.id for record in earlier])  # read first, as the real predictor does
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
    plan_run(store, resolve_inputs(run.inputs, None), {"x": 1, "chunk_length": 500}, run.shard_reads, None, threading.Event())
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


def test_claim_order_deals_shards_round_robin_without_a_final_count() -> None:
    assert claim_order(10, 0, 2, 0, 1) == [0, 2, 4, 6, 8, 9, 7, 5, 3, 1]
    assert claim_order(10, 1, 2, 1, 2) == [3, 7, 1, 5, 9, 8, 6, 4, 2, 0]
    assert claim_order(3, 0, 1, 1, 2) == [1, 0, 2]
    assert sorted(claim_order(2, 3, 4, 0, 1)) == [0, 1]  # more slots than shards
    # more shards published later: the order of those already there does not change for the owner
    assert claim_order(6, 0, 1, 0, 2)[:2] == claim_order(4, 0, 1, 0, 2)[:2] == [0, 2]
    # every worker of every slot gets one of the first shards published
    firsts = {claim_order(4, slot, 2, worker, 2)[0] for slot in range(2) for worker in range(2)}
    assert firsts == {0, 1, 2, 3}


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
    assert reads[-1].split("\t")[5:7] == ["none", "duplicate_id"]
    highest = (out / "prediction_results_highestscore.csv").read_text().splitlines()
    assert highest[1:] == sorted(highest[1:])
    assert json.loads((out / "_SUCCESS").read_text())["files"]["features.h5"]["bytes"] > 0
    assert store.list("_run/parts/") == []  # cleaned up after the marker


def test_parts_of_the_previous_release_merge_to_the_same_bytes(tmp_path: Path) -> None:
    """A run resumed or retried by this version may hold parts in format 1 (one JSON object of
    lists of lines) beside its own: the outputs are byte-identical either way."""
    run, store = make_run(tmp_path, 25, shard_reads=10, group_reads=3, checkpoint_seconds=0.0, write_features=True)
    assert work(run, store, FakePredictor(3)) == 0
    copy = tmp_path / "copy"
    shutil.copytree(run.output, copy)
    old = LocalStore(str(copy))
    committed = [part.rows for index in range(3) for part in read_shard(old, index)[0].parts]
    for key in committed[::2]:  # every other part rewritten as the previous release wrote it
        rows = decode_rows(old.get(key).data, key)
        body = {name: [line.decode() for line in lines(getattr(rows, name))] for name in ("reads", "predictions", "highest")}
        old.put(key, json.dumps({**body, "outcomes": rows.outcomes, "viral": rows.viral, "counts": rows.counts}).encode())
    assert all(old.get(key).data.startswith(b"{") for key in committed[::2]) and len(committed) > 2
    assert finish(replace(run, output=str(copy)), old)[0] == finish(run, store)[0] == SUCCESS
    for name in ("reads.tsv", "prediction_results.txt", "prediction_results_highestscore.csv", "summary.tsv", "features.h5"):
        assert (copy / name).read_bytes() == (Path(run.output) / name).read_bytes(), name
    assert old.list("_run/parts/") == []


def test_a_part_in_an_unknown_format_stops_the_merge_naming_it_and_nothing_appears(tmp_path: Path) -> None:
    run, store = make_run(tmp_path, 12, shard_reads=10, group_reads=3, checkpoint_seconds=0.0)
    assert work(run, store, FakePredictor(3)) == 0
    key = read_shard(store, 1)[0].parts[0].rows
    store.put(key, b"virnucpro-part 3\n{}\n")  # as a later release might write it
    with pytest.raises(BadInput, match=f"part {key} is not in a part format"):
        finish(run, store)
    assert read_marker(store) is None
    assert sorted(p.name for p in Path(run.output).iterdir()) == ["_run"]  # no output, whole or partial


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
    assert reads[15].split("\t")[5:7] == ["none", "shard_failed"]


def test_a_resumed_shard_gives_the_predictor_its_committed_reads_first(tmp_path: Path) -> None:
    """The predictor's memo of sequences learns the reads before the resume point (not scored)."""
    run, store = make_run(tmp_path, 20, shard_reads=10, group_reads=2, checkpoint_seconds=0.0, max_attempts=2)
    predictor = FakePredictor(2, poison={"r015"})
    assert work(run, store, predictor) == 0
    # shard 0, shard 1, its retry (after r010 .. r013 were committed), shard 2 (the duplicate r001)
    assert predictor.earlier == [[], [], [f"r{i:03d}" for i in range(10, 14)], []]
    assert predictor.group_sizes == [2] * 5 + [2] * 3 + [2] + [1]  # the retry starts at r014: none scored twice


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


def test_status_of_a_run_stopped_by_bad_input_says_so_and_exits_65(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said `running; planning: 0%` with exit 0 while _run/plan/error.json held the reason."""
    from job.cli import main
    from job.plan import ERROR_KEY, plan_header

    (tmp_path / "in.fa").write_text(">r1\nACGT\n")
    store = LocalStore(str(tmp_path / "out"))
    plan_header(store, resolve_inputs((str(tmp_path / "in.fa"),), None), {"chunk_length": 500}, 10, None)
    store.create(ERROR_KEY, json.dumps({"error": "in.fa, line 7: a header without a sequence"}).encode())
    assert main(["status", "--output", store.uri]) == exit_codes.BAD_INPUT
    out = capsys.readouterr().out
    assert "stopped by bad input" in out and "stopped by bad input: in.fa, line 7: a header without a sequence" in out
    assert "running" not in out and "ETA" not in out.splitlines()[1]


def test_status_counts_shards_and_projects_the_eta(tmp_path: Path) -> None:
    from job.plan import load_plan
    from job.shards import Part, ShardState
    from job.status import summarize

    run, store = make_run(tmp_path, 29, shard_reads=10)  # 30 records: shards of 10, 10, 10
    plan = load_plan(store)
    now = plan.created_at + 100.0

    def part(reads: int, at: float) -> Part:
        return Part("rows", None, reads, reads, 1.0, at, "cpu")

    states = [
        ShardState(0, parts=(part(10, now - 50),), done=True),
        ShardState(1, owner="w", lease_seconds=60, renewed_at=now, parts=(part(5, now - 10),)),  # half done, leased
        ShardState(2),  # pending
    ]
    status = summarize(plan, states, None, now=now)
    assert (status.done, status.leased, status.pending, status.failed) == (1, 1, 1, 0)
    assert status.reads == 30 and status.reads_committed == 15
    assert status.reads_per_s == 0.15  # 15 reads committed in the 100 s since planning
    assert status.eta_s == 100.0  # 15 reads left at that rate
    assert "ETA 100 s" in status.line() and "0.1 reads/s" in status.line()
    expired = summarize(plan, states, None, now=now + 61)  # the lease has run out: pending again
    assert (expired.leased, expired.pending) == (0, 2)
    # no one at work (the job was stopped): idle, with no rate or ETA that look alive
    assert expired.state == "idle" and expired.reads_per_s is None and expired.eta_s is None
    assert summarize(plan, states, None, now=now + 61, at_work=True).state == "running"  # the job itself, between claims
    assert "idle (no shard is leased: no job at work, or one still starting; to resume, rerun the same command)" in expired.line()
    # stopped while planning (a plan of 10^8 reads takes minutes): nobody holds the planner claim
    planning = replace(plan, complete=False)
    stopped = summarize(planning, states, None, now=now + 61)
    assert stopped.state == "idle" and stopped.eta_s is None and "to resume, rerun" in stopped.line()
    assert summarize(planning, states, None, now=now + 61, planner_renewed=now + 90).state.startswith("planning")
    every = [ShardState(i, parts=(part(10, now),), done=True) for i in range(3)]
    merging = summarize(plan, every, None, now=now, merge_renewed=now + 30)
    assert merging.state == "running" and merging.eta_s == 0.0
    # every shard done, nobody merging (stopped before the merge): it said running, 100%, ETA 0
    for renewed in (None, now - 1):
        unmerged = summarize(plan, every, None, now=now, merge_renewed=renewed)
        assert unmerged.state == "idle" and "every shard final, no merge at work; to merge, rerun" in unmerged.line()
        assert unmerged.eta_s is None and "ETA -" in unmerged.line()
    done = summarize(plan, [ShardState(i, parts=(part(10, now),), done=True) for i in range(3)], "_SUCCESS", now=now)
    assert done.eta_s == 0.0 and done.finished == "_SUCCESS"
    later = summarize(plan, [ShardState(i, parts=(part(10, now),), done=True) for i in range(3)], "_SUCCESS", now=now + 3600)
    assert later == done and later.reads_per_s == 0.3 and later.elapsed_s == 100.0  # a finished run's figures stay


def test_a_working_shard_renews_its_lease_and_logs_progress(monkeypatch) -> None:  # noqa: ANN001
    import job.worker
    from job.shards import ShardState

    class Lease:
        key = "_run/shards/00000.json"
        state = ShardState(0)
        lease_seconds = 0.3
        released = False
        renewals: list[int] = []

        def renew(self, processed: int) -> bool:
            self.renewals.append(processed)
            return True

    class Log:
        events: list[tuple[str, dict]] = []

        def info(self, event: str, **fields: object) -> None:
            self.events.append((event, fields))

        warning = info

    monkeypatch.setattr(job.worker, "PROGRESS_SECONDS", 0.0)  # a line at every renewal, not every 30 s
    lease, log = Lease(), Log()
    renewer = job.worker._ShardRenewer(lease, 7, log)  # renews every 0.1 s
    renewer.start()
    time.sleep(0.45)
    renewer.stop()
    assert len(lease.renewals) >= 2 and set(lease.renewals) == {7}
    assert ("shard_progress", {"processed": 7, "committed": 0}) in log.events


def test_a_stop_mid_group_records_the_reads_scored_so_the_next_holder_counts_them_redone(tmp_path: Path) -> None:
    from job.plan import load_plan

    run, store = make_run(tmp_path, 10, shard_reads=10, group_reads=5, checkpoint_seconds=1000.0)
    stop = threading.Event()

    class StoppedInTheFirstGroup(FakePredictor):
        def _score(self, records: list[Record], with_features: bool) -> Iterator[ReadResult]:
            for n, result in enumerate(super()._score(records, with_features)):
                if n == 3:  # three reads scored, none committed: the grace period ends
                    stop.set()
                    worker.stop_now()
                yield result

    worker = Worker(WorkerSpec(run, 0, 1, 0), store, load_plan(store), StoppedInTheFirstGroup(5), "cpu", stop)  # type: ignore[arg-type]
    worker.run()
    state, _ = read_shard(store, 0)
    assert (state.owner, state.reads_done, state.processed) == (None, 0, 3)
    heir = claim(store, 0, "heir", 60, "cpu", ExpiryObserver())
    assert heir is not None and heir.state.redone_reads == 3 and heir.state.interruptions == 1


def test_status_of_a_run_stopped_before_its_merge_is_idle_and_a_merge_at_work_is_running(tmp_path: Path) -> None:
    """Every shard done and no outputs: it said running, 100%, ETA 0 s, with nobody merging."""
    from job.status import run_status

    run, store = make_run(tmp_path, 25, shard_reads=10)
    assert work(run, store, FakePredictor(3)) == 0
    assert run_status(store).state == "idle"
    assert "to merge, rerun the same command" in run_status(store).line()
    claim = MergeClaim(store, "another machine", 30.0)
    assert claim.acquire()
    assert run_status(store).state == "running"
    claim.release()
    assert run_status(store).state == "idle"
    assert finish(run, store)[0] == "_SUCCESS" and run_status(store).state == "_SUCCESS"


def test_closing_a_watch_drops_the_shard_reads_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped job's progress look queued every shard's GET: the process could not exit
    before the pool drained them (at 10^8 reads on S3, past the grace period)."""
    import job.status
    from job.plan import load_plan

    _run, store = make_run(tmp_path, 160, shard_reads=1)
    read_shard, reads = job.status.read_shard, []

    def slow(store, index):  # noqa: ANN001, ANN202
        reads.append(index)
        time.sleep(0.1)
        return read_shard(store, index)

    monkeypatch.setattr(job.status, "read_shard", slow)
    watch = job.status.RunWatch(store, load_plan(store))
    def look() -> None:
        with contextlib.suppress(CancelledError):  # how a closed watch ends a look
            watch.look()

    looking = threading.Thread(target=look)
    looking.start()
    time.sleep(0.15)
    closed = time.monotonic()
    watch.close()
    looking.join(10)
    assert time.monotonic() - closed < 0.5 and len(reads) <= 48, len(reads)  # 160 queued: 1 s in rounds of 16
