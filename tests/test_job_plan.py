"""Plan: deterministic shards across files, run-wide duplicates, refusal of changed inputs."""
from __future__ import annotations

import gzip
import json
import os
import threading
from pathlib import Path

import boto3
import pytest

from core.reads import mark_duplicates, open_records as open_fasta
from job.errors import BadInput
from job.inputs import RUN_MARK, InputObject, pair_mates, resolve_inputs
from job.plan import PLAN_KEY, Plan, Segment, load_plan, plan_run, shard_records
from job.store import LocalStore, open_store
from job_support import bucket, s3_endpoint  # noqa: F401 (fixtures)

SETTINGS = {"classifier": {"sha256": "abc"}, "chunk_length": 500, "write_features": False}


def fasta(path: Path, ids: list[str], gz: bool = False) -> Path:
    text = "".join(f">{i} some description\nACGTACGTAC\nGTACG\n" for i in ids).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def build(inputs, shard_reads, root: Path):  # noqa: ANN001, ANN201
    """The complete plan of `inputs` in a fresh local store under `root`; (plan, store)."""
    store = LocalStore(str(root / f"out-{len(list(root.glob('out-*')))}"))
    return plan_run(store, inputs, SETTINGS, shard_reads, None, threading.Event()), store


def test_shards_span_files_and_mark_run_wide_duplicates(tmp_path: Path) -> None:
    fasta(tmp_path / "a.fa", ["r1", "r2", "r3"])
    fasta(tmp_path / "b.fa.gz", ["r4", "r1", "r5", "r6"], gz=True)
    (tmp_path / "notes.txt").write_text("not fasta")
    inputs = resolve_inputs((str(tmp_path),), None)
    assert [Path(i.uri).name for i in inputs] == ["a.fa", "b.fa.gz"]
    plan, store = build(inputs, 3, tmp_path)
    assert [s.reads for s in plan.shards] == [3, 3, 1]
    record = len(">r4 some description\nACGTACGTAC\nGTACG\n")
    # gzip: the segment's text is a copy under the run
    assert plan.shards[1].segments == (Segment(1, 0, 3, 0, 3 * record, 1, "_run/inputs/00001-0.gz"),)
    assert plan.shards[1].duplicates == (1,)  # r1 again, second read of shard 1
    ids = [[(r.id, r.status) for r in shard_records(plan, s, None, store)] for s in plan.shards]
    assert ids == [
        [("r1", None), ("r2", None), ("r3", None)],
        [("r4", None), ("r1", "duplicate_id"), ("r5", None)],
        [("r6", None)],
    ]
    plan2, _ = build(inputs, 3, tmp_path)
    assert plan2.run_id == plan.run_id and plan2.shards == plan.shards


def test_shard_boundary_inside_a_file(tmp_path: Path) -> None:
    fasta(tmp_path / "a.fa", ["a1", "a2"])
    fasta(tmp_path / "b.fa", ["b1", "b2", "b3"])
    inputs = resolve_inputs((str(tmp_path / "a.fa"), str(tmp_path / "b.fa")), None)
    plan, store = build(inputs, 3, tmp_path)
    record = len(">a1 some description\nACGTACGTAC\nGTACG\n")
    assert plan.shards[0].segments == (Segment(0, 0, 2, 0, 2 * record, 1, None), Segment(1, 0, 1, 0, record, 1, None))
    assert plan.shards[1].segments == (Segment(1, 1, 2, record, 3 * record, 4, None),)
    assert [r.id for r in shard_records(plan, plan.shards[1], None, store)] == ["b2", "b3"]


def test_resume_refuses_changed_input_and_arguments(tmp_path: Path) -> None:
    path = fasta(tmp_path / "a.fa", ["r1", "r2"])
    store = LocalStore(str(tmp_path / "out"))
    stop = threading.Event()
    plan = plan_run(store, resolve_inputs((str(path),), None), SETTINGS, 10, None, stop)
    assert plan_run(store, resolve_inputs((str(path),), None), SETTINGS, 10, None, stop) == plan
    changed = {**SETTINGS, "chunk_length": 300}
    with pytest.raises(BadInput, match="--chunk-length differs"):
        plan_run(store, resolve_inputs((str(path),), None), changed, 10, None, stop)
    fasta(path, ["r1", "r2", "r3"])
    os.utime(path, ns=(1, 1))
    with pytest.raises(BadInput, match=f"input {path} changed"):
        plan_run(store, resolve_inputs((str(path),), None), SETTINGS, 10, None, stop)


def test_local_fingerprint_sees_a_same_size_edit_with_mtime_restored(tmp_path: Path) -> None:
    path = fasta(tmp_path / "a.fa", ["r1", "r2"])
    before = resolve_inputs((str(path),), None)[0]
    stat = path.stat()
    path.write_bytes(path.read_bytes().replace(b"r2", b"r9"))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime restored
    after = resolve_inputs((str(path),), None)[0]
    assert after.size == before.size and after.version.split(":")[0] == before.version.split(":")[0]
    assert after != before  # the ctime moved
    moved = tmp_path / "b.fa"
    os.replace(fasta(tmp_path / "new.fa", ["r1", "r9"]), moved)
    assert resolve_inputs((str(moved),), None)[0].version.split(":")[2] == str(moved.stat().st_ino)


def test_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=f"input {tmp_path / 'nope.fa'} does not exist"):
        resolve_inputs((str(tmp_path / "nope.fa"),), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no read files"):
        resolve_inputs((str(tmp_path / "empty"),), None)
    empty = tmp_path / "empty.fa"
    empty.write_bytes(b"")
    plan, _ = build(resolve_inputs((str(empty),), None), 10, tmp_path)
    assert plan.shards == () and plan.total_reads == 0 and plan.empty_inputs == (str(empty),)


def test_inputs_named_twice_tabs_in_names_and_broken_links_are_refused(tmp_path: Path) -> None:
    a = fasta(tmp_path / "a.fa", ["r1"])
    with pytest.raises(BadInput, match=f"input {a} is named twice .*name each file once"):
        resolve_inputs((str(a), str(tmp_path)), None)  # the file, then its directory
    tabbed = fasta(tmp_path / "tab\tname.fa", ["r2"])
    with pytest.raises(BadInput, match="has a tab or a line break in its name.*rename the file"):
        resolve_inputs((str(tabbed),), None)
    tabbed.unlink()
    (tmp_path / "gone.fq").symlink_to(tmp_path / "nowhere.fq")
    with pytest.raises(BadInput, match=f"input {tmp_path / 'gone.fq'} \\(under {tmp_path}\\) is not a readable file"):
        resolve_inputs((str(tmp_path),), None)


def test_a_directory_input_passes_over_hidden_files_and_virnucpro_outputs(
    tmp_path: Path, bucket: str,  # noqa: F811
) -> None:
    """An --output kept under the input directory: its viral_reads.fa.gz was read as an input
    by the next run (and refused a rerun as an added input); macOS's ._ copies stopped the run."""
    layout = {
        "sample.fa": b">r1\nACGT\n",
        "lane/s_2.fq": b"@r2\nACGT\n+\nIIII\n",
        "._sample.fa": b"\0\x05\x16\x07 AppleDouble",
        ".cache/old.fa": b">r3\nACGT\n",
        "run1/viral_reads.fa.gz": gzip.compress(b">r1\nACGT\n"),
        "run1/_run/plan.json": b"{}",
        "run1/_run/copies/0.fa.gz": gzip.compress(b">r1\nACGT\n"),
        "run1b/notes.fa": b">r4\nACGT\n",  # a sibling whose name starts like the output's
        "mine/_run/r5.fa": b">r5\nACGT\n",  # the user's own folder called _run: no plan in it
        "mine/r6.fa": b">r6\nACGT\n",
    }
    assert "/".join(RUN_MARK) == PLAN_KEY
    s3 = boto3.client("s3")
    for name, body in layout.items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(body)
        s3.put_object(Bucket=bucket, Key=f"data/{name}", Body=body)
    read = ("lane/s_2.fq", "mine/_run/r5.fa", "mine/r6.fa", "run1b/notes.fa", "sample.fa")
    local = resolve_inputs((str(tmp_path / "data"),), None)
    assert [obj.uri for obj in local] == [str(tmp_path / "data" / n) for n in read]
    remote = resolve_inputs((f"s3://{bucket}/data/",), None)
    assert [obj.uri for obj in remote] == [f"s3://{bucket}/data/{n}" for n in read]
    assert [obj.uri for obj in resolve_inputs((str(tmp_path / "data" / "._sample.fa"),), None)] == [
        str(tmp_path / "data" / "._sample.fa")]  # a file named on its own is read as named
    for name in ("order/S1-rep/x.fq", "order/S1/x.fq"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"@r\nACGT\n+\nIIII\n")
    ordered = [obj.uri for obj in resolve_inputs((str(tmp_path / "order"),), None)]
    assert ordered == [str(tmp_path / "order" / n) for n in ("S1/x.fq", "S1-rep/x.fq")]  # as releases before sorted them
    only_output = str(tmp_path / "data" / "run1")  # an output given as the input: say why nothing is read
    with pytest.raises(BadInput, match=f"input {only_output} holds no read files but hidden ones \\(0\\) and those "
                                       f"inside VirNucPro outputs \\(2: {only_output}\\).*one by one"):
        resolve_inputs((only_output,), None)


def test_the_files_of_a_pair_are_told_by_their_names_and_a_plan_of_before_has_no_mates(tmp_path: Path) -> None:
    def mates(*names: str) -> tuple[int, ...]:
        return pair_mates([InputObject(name, 1, "v") for name in names])

    assert mates("/d/SRR1_1.fastq", "/d/SRR1_2.fastq", "/d/SRR1.fastq") == (1, 2, 0)
    assert mates("/d/S1_L001_R2_001.fastq.gz", "/d/S1_L001_R1_001.fastq.gz") == (2, 1)
    assert mates("/d/R1.fq.gz", "/d/R2.fq.gz") == mates("s3://b/x/r.1.fa", "s3://b/x/r.2.fa") == (1, 2)
    assert mates("/d/s_1_1.fq", "/d/s_1_2.fq") == (1, 2)  # the mate number is the last that pairs
    assert mates("/d/sample1.fa", "/d/sample2.fa") == (0, 0)  # two samples, not a pair
    assert mates("/d/x_1.fq", "/e/x_2.fq") == (0, 0) and mates("/d/x_R1.fq") == (0,)  # other folder; no partner
    pair = [fasta(tmp_path / "p_1.fa", ["r1", "r2"]), fasta(tmp_path / "p_2.fa", ["r1", "r2"])]
    plan, store = build(resolve_inputs(tuple(map(str, pair)), None), 10, tmp_path)
    assert plan.mates == (1, 2) and [s.duplicates for s in plan.shards] == [()]
    assert [r.id for r in shard_records(plan, plan.shards[0], None, store)] == ["r1/1", "r2/1", "r1/2", "r2/2"]
    header = json.loads(plan.header_json())
    del header["mates"]  # as the release before wrote it
    before = Plan.from_header(json.dumps(header).encode(), "out")
    assert before.mates == () and before.mate(1) == 0


def test_concurrent_planners_agree_on_s3(bucket: str, tmp_path: Path) -> None:  # noqa: F811
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="in/x.fa", Body=fasta(tmp_path / "x.fa", [f"r{i}" for i in range(50)]).read_bytes())
    s3.put_object(Bucket=bucket, Key="in/y.fasta.gz", Body=gzip.compress(b">y1\nACGT\n"))
    uri = f"s3://{bucket}/out"
    plans = []

    def start() -> None:
        inputs = resolve_inputs((f"s3://{bucket}/in/",), None)
        plans.append(plan_run(open_store(uri), inputs, SETTINGS, 7, None, threading.Event()))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(plans) == 3 and plans[0] == plans[1] == plans[2]
    assert load_plan(open_store(uri)) == plans[0]
    assert plans[0].total_reads == 51 and len(plans[0].shards) == 8
    assert [i.uri for i in plans[0].inputs] == [f"s3://{bucket}/in/x.fa", f"s3://{bucket}/in/y.fasta.gz"]
    assert [r.id for r in shard_records(plans[0], plans[0].shards[-1], None, open_store(uri))] == ["r49", "y1"]


def test_workers_seek_to_their_shard_in_plain_text(tmp_path: Path) -> None:
    messy = tmp_path / "messy.fa"
    messy.write_bytes(b"\r\n>a x\r\nAC\r\n\r\nGT\r\n>b\r\n>c\nacg\n  >d\nTTT\n>e\nA-C\n>a\nGG\n")
    plan, store = build(resolve_inputs((str(messy),), None), 2, tmp_path)
    expected = [(r.id, r.sequence, r.status, r.line) for r in mark_duplicates(open_fasta(str(messy)), set())]
    got = [(r.id, r.sequence, r.status, r.line) for s in plan.shards for r in shard_records(plan, s, None, store)]
    assert got == expected and all(g.copy is None for s in plan.shards for g in s.segments)
