"""The data path at scale (issue 11): streaming plan, gzip shard copies, run-wide digests,
automatic shard size, status while planning; S3 inputs pinned to their planned ETag."""
from __future__ import annotations

import gzip
import io
import json
import random
import threading
import time
import zlib
from pathlib import Path

import boto3
import numpy as np
import pytest

import job.plan
import job.status
from job.errors import BadInput
from job.inputs import InputChanged, open_input, resolve_inputs
from job.plan import DONE_KEY, Planner, load_plan, plan_header, plan_run, shard_plan_key, shard_records
from job.seen import SeenIds
from job.shards import read_shard, shard_key
from job.status import RunStatus, RunWatch, run_status
from job.store import LocalStore
from job_support import bucket, s3_endpoint  # noqa: F401 (fixtures)

SETTINGS = {"classifier": {"sha256": "abc"}, "chunk_length": 500}


def reads_text(count: int, seed: int = 0, prefix: str = "r") -> bytes:
    rng = random.Random(seed)
    lines = []
    for n in range(count):
        sequence = "".join(rng.choice("ACGT") for _ in range(rng.choice([30, 90, 200])))
        lines.append(f">{prefix}{n} read {n}\n{sequence[:60]}\n{sequence[60:]}\n")
    return "".join(lines).encode()


def multi_member(text: bytes, pieces: int) -> bytes:
    step = len(text) // pieces + 1
    return b"".join(gzip.compress(text[i:i + step]) for i in range(0, len(text), step))


def bgzf(text: bytes) -> bytes:
    """BGZF: members of at most 64 KiB with the BC extra field, then the empty EOF member."""
    out = []
    for start in range(0, len(text), 65280):
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = deflate.compress(text[start:start + 65280]) + deflate.flush()
        block = text[start:start + 65280]
        size = len(body) + 25
        header = b"\x1f\x8b\x08\x04" + b"\0" * 4 + b"\0\xff" + (6).to_bytes(2, "little") + b"BC" + (2).to_bytes(2, "little")
        out.append(header + (size).to_bytes(2, "little") + body
                   + zlib.crc32(block).to_bytes(4, "little") + len(block).to_bytes(4, "little"))
    out.append(bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000"))
    return b"".join(out)


def records_of(plan, store) -> list[tuple]:  # noqa: ANN001
    return [(r.id, r.sequence, r.status, r.line) for s in plan.shards for r in shard_records(plan, s, None, store)]


@pytest.mark.parametrize("pack", ["gzip", "multi-member", "bgzf"])
def test_gzip_in_many_shards_reads_like_plain_and_each_worker_reads_only_its_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pack: str,
) -> None:
    text = reads_text(3000, seed=1) + b">r5 a repeat\nACGT\n"
    (tmp_path / "plain.fa").write_bytes(text)
    packed = {"gzip": gzip.compress(text), "multi-member": multi_member(text, 7), "bgzf": bgzf(text)}[pack]
    (tmp_path / "packed.fa.gz").write_bytes(packed)
    assert gzip.decompress(packed) == text
    monkeypatch.setattr(job.plan, "SCAN_BLOCK", 8192)  # many blocks: shard cuts fall inside blocks
    plain, plain_store = plan_run(LocalStore(str(tmp_path / "o1")), resolve_inputs((str(tmp_path / "plain.fa"),), None),
                                  SETTINGS, 100, None, threading.Event()), LocalStore(str(tmp_path / "o1"))
    packed_store = LocalStore(str(tmp_path / "o2"))
    zipped = plan_run(packed_store, resolve_inputs((str(tmp_path / "packed.fa.gz"),), None), SETTINGS, 100, None,
                      threading.Event())
    assert len(zipped.shards) == 31 and zipped.shards[-1].duplicates == (0,)
    assert records_of(zipped, packed_store) == records_of(plain, plain_store)

    counted: list[int] = []
    real = job.plan.read_records

    def counting(stream, name, first_line=1):  # noqa: ANN001, ANN202
        data = stream.read()
        counted.append(len(data))
        return real(io.BytesIO(data), name, first_line)

    monkeypatch.setattr(job.plan, "read_records", counting)
    for shard in zipped.shards:
        counted.clear()
        list(shard_records(zipped, shard, None, packed_store))
        own = sum(segment.end - segment.offset for segment in shard.segments)
        assert sum(counted) <= own + 1, (shard.index, sum(counted), own)  # its own text, nothing before it
    assert sum(counted) < len(text) / 10  # the last shard did not inflate what comes before it


def test_first_shard_is_claimed_before_planning_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_job_worker import FakePredictor

    from job.config import RunConfig
    from job.worker import Worker, WorkerSpec

    (tmp_path / "in.fa").write_bytes(reads_text(400, seed=2))
    monkeypatch.setattr(job.plan, "SCAN_BLOCK", 2048)
    store = LocalStore(str(tmp_path / "out"))
    run = RunConfig(inputs=(str(tmp_path / "in.fa"),), output=store.uri, esm_model="-", dnabert_model="-",
                    classifier="-", shard_reads=20, group_reads=5, checkpoint_seconds=0.0)
    header = plan_header(store, resolve_inputs(run.inputs, None), SETTINGS, 20, None)
    planner = threading.Thread(target=Planner(store, header, None, threading.Event(), block_delay=0.2).scan)
    planner.start()
    worker = Worker(WorkerSpec(run, 0, 1, 0), store, header, FakePredictor(5), "cpu", threading.Event())
    result: list[int] = []
    working = threading.Thread(target=lambda: result.append(worker.run()))
    working.start()
    deadline = time.monotonic() + 60
    while store.get(shard_key(0)) is None and time.monotonic() < deadline:  # the worker's claim record
        time.sleep(0.02)
    assert store.get(shard_key(0)) is not None and store.get(DONE_KEY) is None  # claimed, plan not complete
    partial = run_status(store)
    assert partial is not None and not partial.planned and 0 < partial.scanned < 1
    assert "planning:" in partial.line()
    planner.join()
    working.join(timeout=120)
    plan = load_plan(store)
    assert result == [0] and plan.complete and plan.total_reads == 400
    done = run_status(store)
    assert done.planned and done.reads == 400 and done.reads_committed == 400
    # The job's progress looks again and again: the shards found final are not read again
    watch = RunWatch(store, header)

    def counts(status: RunStatus) -> tuple:
        return status.shards, status.done, status.reads, status.reads_committed, status.planned

    assert counts(watch.look()) == counts(done) == (20, 20, 400, 400, True)
    read: list[int] = []
    monkeypatch.setattr(job.status, "read_shard", lambda store, index: read.append(index) or read_shard(store, index))
    assert counts(watch.look()) == counts(done) and read == []


def test_automatic_shard_size(tmp_path: Path) -> None:
    small = tmp_path / "small.fa"
    small.write_bytes(reads_text(20_000, seed=3))
    inputs = resolve_inputs((str(small),), None)
    header = plan_header(LocalStore(str(tmp_path / "o1")), inputs, SETTINGS, None, None)
    assert 500 <= header.shard_reads <= 20_000 // 4  # several shards: --workers 2 has work for both
    assert plan_header(LocalStore(str(tmp_path / "o2")), inputs, SETTINGS, None, None).shard_reads == header.shard_reads
    big = tmp_path / "big.fa.gz"  # 2 million short reads: shards stay at the 20,000-read cap
    big.write_bytes(gzip.compress(b"".join(b">%d\nACGTACGTAC\n" % n for n in range(2_000_000)), 1))
    assert plan_header(LocalStore(str(tmp_path / "o3")), resolve_inputs((str(big),), None), SETTINGS, None, None
                       ).shard_reads == 20_000
    assert plan_header(LocalStore(str(tmp_path / "o4")), inputs, SETTINGS, 77, None).shard_reads == 77  # forced


def test_seen_ids_finds_every_repeat_and_only_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(4)
    pool = [f"id{n}".encode() for n in range(30_000)]
    seen, reference, expected, got = SeenIds(), set(), [], []
    for _ in range(40):
        batch = [rng.choice(pool) for _ in range(rng.randint(0, 2000))]
        for read_id in batch:
            expected.append(read_id in reference)
            reference.add(read_id)
        got.extend(seen.add(batch).tolist())
    assert got == expected and len(seen) == len(reference) and seen.nbytes == 16 * len(reference)
    assert len(seen._runs) <= 12  # merged LSM-style: a few runs, not one per batch
    assert all(bool(np.all(high[1:] >= high[:-1])) for high, _low in seen._runs)  # what searchsorted needs
    # distinct ids whose digests share the high half are still told apart by the low half
    import job.seen

    monkeypatch.setattr(job.seen, "xxh3_128_digest", lambda b: b"\0" * 8 + b.ljust(8, b"\0")[:8])
    clash = SeenIds()
    assert clash.add([b"a", b"b", b"a"]).tolist() == [False, False, True]
    assert clash.add([b"c", b"b"]).tolist() == [False, True]


def test_an_s3_input_is_read_at_its_planned_version_only(bucket: str, tmp_path: Path) -> None:  # noqa: F811
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="in/a.fa", Body=reads_text(50))
    obj = resolve_inputs((f"s3://{bucket}/in/a.fa",), None)[0]
    assert open_input(obj, None, 10, 20).read() == reads_text(50)[10:20]
    s3.put_object(Bucket=bucket, Key="in/a.fa", Body=reads_text(50, seed=9))  # overwritten
    with pytest.raises(InputChanged, match=f"input s3://{bucket}/in/a.fa changed while the run was using it"):
        open_input(obj, None, 10, 20)


def test_an_empty_input_is_recorded_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "empty.fq").write_bytes(b"")
    (tmp_path / "full.fa").write_bytes(reads_text(3))
    inputs = resolve_inputs((str(tmp_path / "empty.fq"), str(tmp_path / "full.fa")), None)
    plan = plan_run(LocalStore(str(tmp_path / "out")), inputs, SETTINGS, 10, None, threading.Event())
    assert plan.empty_inputs == (str(tmp_path / "empty.fq"),) and plan.total_reads == 3
    body = json.loads(LocalStore(str(tmp_path / "out")).get(DONE_KEY).data)
    assert body["empty_inputs"] == [str(tmp_path / "empty.fq")]
    assert json.loads(LocalStore(str(tmp_path / "out")).get(shard_plan_key(0)).data)["reads"] == 3


def test_a_dead_planner_is_taken_over_and_the_heir_recreates_the_same_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from job.batch import _PlanThread
    from job.errors import Interrupted
    from job.lease import ExpiryObserver
    from job.lease import claim as take_claim
    from job.plan import PLANNER_KEY

    (tmp_path / "in.fa.gz").write_bytes(gzip.compress(reads_text(600, seed=6)))
    inputs = resolve_inputs((str(tmp_path / "in.fa.gz"),), None)
    monkeypatch.setattr(job.plan, "SCAN_BLOCK", 4096)
    store = LocalStore(str(tmp_path / "out"))
    header = plan_header(store, inputs, SETTINGS, 50, None)
    assert take_claim(store, PLANNER_KEY, "dead", 0.5, ExpiryObserver()) is not None  # never renewed
    dying = threading.Event()
    dead = Planner(store, header, None, dying, block_delay=0.05)
    scanning = threading.Thread(target=lambda: pytest.raises(Interrupted, dead.scan))
    scanning.start()
    while store.get(shard_plan_key(1)) is None:
        time.sleep(0.01)
    dying.set()  # the planner dies mid-scan, its claim left held
    scanning.join()
    assert store.get(DONE_KEY) is None
    heir = _PlanThread(store, header, None, threading.Event(), "heir", 0.5)
    heir.start()
    heir.join(timeout=60)
    assert heir.exception is None
    plan = load_plan(store)
    fresh = plan_run(LocalStore(str(tmp_path / "fresh")), inputs, SETTINGS, 50, None, threading.Event())
    assert plan.complete and plan.shards == fresh.shards and plan.total_reads == 600
    for shard in plan.shards:  # the copies the dead planner wrote are the heir's, byte for byte
        for segment in shard.segments:
            assert store.get(segment.copy).data == LocalStore(str(tmp_path / "fresh")).get(segment.copy).data
    assert json.loads(store.get(PLANNER_KEY).data)["owner"] is None  # released when done


def test_a_broken_s3_stream_is_resumed_where_it_stopped_at_the_planned_version(bucket: str) -> None:  # noqa: F811
    from botocore.exceptions import ResponseStreamingError

    import job.inputs

    data = reads_text(400)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="in/a.fa", Body=data)
    obj = resolve_inputs((f"s3://{bucket}/in/a.fa",), None)[0]
    requests: list[dict] = []

    class Breaking:
        def __init__(self, body) -> None:  # noqa: ANN001
            self.body, self.given = body, 0

        def read(self, size: int) -> bytes:
            if self.given >= 5000:
                raise ResponseStreamingError(error="connection reset")
            chunk = self.body.read(min(size, 1000))
            self.given += len(chunk)
            return chunk

        def close(self) -> None:
            self.body.close()

    class Client:
        def get_object(self, **request):  # noqa: ANN003, ANN202
            requests.append(request)
            response = s3.get_object(**request)
            return {"Body": Breaking(response["Body"]) if len(requests) == 1 else response["Body"]}

    stream = io.BufferedReader(job.inputs._PinnedObject(obj, Client(), 100, None), 4096)
    assert stream.read() == data[100:]
    assert [r.get("Range") for r in requests] == ["bytes=100-", "bytes=5100-"]
    assert all(r["IfMatch"] == obj.version for r in requests)


def test_a_truncated_gzip_input_is_a_plan_error_naming_the_file_and_a_line_near_the_cut(tmp_path: Path) -> None:
    packed = gzip.compress(reads_text(2000, seed=7))
    (tmp_path / "cut.fa.gz").write_bytes(packed[: len(packed) // 2])
    left = zlib.decompressobj(31).decompress(packed[: len(packed) // 2])  # the text before the cut
    with pytest.raises(BadInput, match=f"{tmp_path / 'cut.fa.gz'}, line [0-9]+: the gzip stream is damaged") as error:
        plan_run(LocalStore(str(tmp_path / "out")), resolve_inputs((str(tmp_path / "cut.fa.gz"),), None),
                 SETTINGS, 100, None, threading.Event())
    line = int(str(error.value).split(", line ")[1].split(":")[0])
    # the last record header before the cut, give or take the 64 KiB the reader decompresses at a time
    assert left[: len(left) - 2**16].count(b"\n") < line <= left.count(b"\n")
    assert left.split(b"\n")[line - 1].startswith(b">")
    assert json.loads(LocalStore(str(tmp_path / "out")).get(job.plan.ERROR_KEY).data)["error"].startswith(
        f"{tmp_path / 'cut.fa.gz'}, line ")


@pytest.mark.parametrize("damage", ["a flipped byte in the deflate data", "bytes that are not gzip after the stream"])
def test_a_damaged_gzip_input_is_a_plan_error_with_the_automatic_shard_size(tmp_path: Path, damage: str) -> None:
    packed = gzip.compress(reads_text(2000, seed=7), mtime=0)
    if damage.startswith("a flipped"):
        packed = packed[:10] + bytes([packed[10] ^ 0x07]) + packed[11:]
    else:
        packed += b"garbage\n"
    (tmp_path / "bad.fa.gz").write_bytes(packed)
    with pytest.raises(BadInput, match=f"{tmp_path / 'bad.fa.gz'}, line [0-9]+: the gzip stream is damaged"):
        plan_run(LocalStore(str(tmp_path / "out")), resolve_inputs((str(tmp_path / "bad.fa.gz"),), None),
                 SETTINGS, None, None, threading.Event())
    # Fixed, then the same command again: the failed run's output cannot take it, and says how
    (tmp_path / "bad.fa.gz").write_bytes(gzip.compress(reads_text(2000, seed=7), mtime=0))
    fixed = f"the run at {tmp_path / 'out'} stopped on bad input: run the fixed inputs with another --output"
    with pytest.raises(BadInput, match=f"input {tmp_path / 'bad.fa.gz'} changed since .*; restore it, or {fixed}"):
        plan_run(LocalStore(str(tmp_path / "out")), resolve_inputs((str(tmp_path / "bad.fa.gz"),), None),
                 SETTINGS, None, None, threading.Event())


def test_zero_padding_after_a_gzip_stream_is_ignored_as_gzip_does(tmp_path: Path) -> None:
    (tmp_path / "padded.fa.gz").write_bytes(gzip.compress(reads_text(2000, seed=7)) + bytes(512))
    plan = plan_run(LocalStore(str(tmp_path / "out")), resolve_inputs((str(tmp_path / "padded.fa.gz"),), None),
                    SETTINGS, None, None, threading.Event())
    assert plan.complete and plan.total_reads == 2000
