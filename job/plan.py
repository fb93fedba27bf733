"""The run's plan: which reads make up which shard, fixed once for the life of the run.

The planner streams every input once: it counts the reads, cuts them into shards of
`shard_reads` consecutive reads (a shard may span input files), and finds ids repeated
anywhere in the run, so that workers, which each see one shard, still mark every repeat
``duplicate_id``. The plan also records the inputs' fingerprints and the arguments that
change results; a resumed run with different ones is refused rather than mixed.

The plan is written once, with a conditional create: of several processes that plan the
same run at the same moment, one plan wins and the others adopt it.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice

from core.reads import Record, mark_duplicates
from job.errors import BadInput, Interrupted
from job.inputs import InputObject, indexed_records, read_records, stat_input
from job.store import Store

PLAN_KEY = "_run/plan.json"


@dataclass(frozen=True)
class Segment:
    """Reads `start` .. `start + count - 1` (0-based, file order) of input number `input`."""

    input: int
    start: int
    count: int
    offset: int | None  # byte offset of read `start` in a plain-text input; None for gzip


@dataclass(frozen=True)
class Shard:
    index: int
    segments: tuple[Segment, ...]
    reads: int
    duplicates: tuple[int, ...]  # positions within the shard of reads whose id came earlier


@dataclass(frozen=True)
class Plan:
    run_id: str
    inputs: tuple[InputObject, ...]
    settings: dict
    shard_reads: int
    shards: tuple[Shard, ...]
    created_at: float

    @property
    def total_reads(self) -> int:
        return sum(shard.reads for shard in self.shards)

    def to_json(self) -> bytes:
        body = {
            "run_id": self.run_id,
            "created_at": self.created_at,
            "inputs": [obj.fingerprint() for obj in self.inputs],
            "settings": self.settings,
            "shard_reads": self.shard_reads,
            "shards": [
                {
                    "index": s.index,
                    "reads": s.reads,
                    "segments": [[g.input, g.start, g.count, g.offset] for g in s.segments],
                    "duplicates": list(s.duplicates),
                }
                for s in self.shards
            ],
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        body = json.loads(data)
        return cls(
            run_id=body["run_id"],
            inputs=tuple(InputObject(i["uri"], i["size"], i["version"]) for i in body["inputs"]),
            settings=body["settings"],
            shard_reads=body["shard_reads"],
            shards=tuple(
                Shard(s["index"], tuple(Segment(*g) for g in s["segments"]), s["reads"], tuple(s["duplicates"]))
                for s in body["shards"]
            ),
            created_at=body["created_at"],
        )


def load_plan(store: Store) -> Plan | None:
    stored = store.get(PLAN_KEY)
    return None if stored is None else Plan.from_json(stored.data)


def plan_run(
    store: Store,
    inputs: list[InputObject],
    settings: dict,
    shard_reads: int,
    endpoint_url: str | None,
    stop: threading.Event,
) -> Plan:
    """The run's plan: the stored one (checked against these inputs and settings), else a new one."""
    existing = load_plan(store)
    if existing is None:
        fresh = build_plan(inputs, settings, shard_reads, endpoint_url, stop)
        if store.create(PLAN_KEY, fresh.to_json()) is not None:
            return fresh
        existing = load_plan(store)  # another starter planned first: adopt its plan
        assert existing is not None
    check_plan(existing, inputs, settings, store.uri)
    return existing


def build_plan(
    inputs: list[InputObject],
    settings: dict,
    shard_reads: int,
    endpoint_url: str | None,
    stop: threading.Event,
) -> Plan:
    shards: list[Shard] = []
    segments: list[Segment] = []
    duplicates: list[int] = []
    in_shard = 0  # reads in the shard being filled
    seen: set[str] = set()
    for number, obj in enumerate(inputs):
        start = 0  # first read of the current segment in this input
        count = 0  # reads of this input so far
        offset: int | None = None  # where read `start` begins
        for record, record_offset in _marked(indexed_records(obj, endpoint_url), seen):
            if count == start:
                offset = record_offset
            if record.status == "duplicate_id":
                duplicates.append(in_shard)
            count += 1
            in_shard += 1
            if in_shard == shard_reads:
                segments.append(Segment(number, start, count - start, offset))
                shards.append(Shard(len(shards), tuple(segments), in_shard, tuple(duplicates)))
                segments, duplicates, in_shard, start = [], [], 0, count
            if count % 4096 == 0 and stop.is_set():
                raise Interrupted("stopped while planning")
        if count > start:
            segments.append(Segment(number, start, count - start, offset))
        if stat_input(obj, endpoint_url) != obj:
            raise BadInput(f"input {obj.uri} changed while it was being read; rerun once it is complete")
    if in_shard:
        shards.append(Shard(len(shards), tuple(segments), in_shard, tuple(duplicates)))
    identity = json.dumps([[o.fingerprint() for o in inputs], settings, shard_reads], sort_keys=True)
    run_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return Plan(run_id, tuple(inputs), settings, shard_reads, tuple(shards), time.time())


def _marked(
    indexed: Iterator[tuple[Record, int | None]], seen: set[str]
) -> Iterator[tuple[Record, int | None]]:
    """`mark_duplicates` over (record, offset) pairs."""
    offsets: list[int | None] = []

    def records() -> Iterator[Record]:
        for record, offset in indexed:
            offsets.append(offset)
            yield record

    for record in mark_duplicates(records(), seen):
        yield record, offsets.pop()


def check_plan(plan: Plan, inputs: list[InputObject], settings: dict, output: str) -> None:
    """Refuse to resume a run whose inputs or result-changing arguments differ."""
    fix = f"restore them, or start a new run with another --output than {output}"
    planned = {obj.uri: obj for obj in plan.inputs}
    given = {obj.uri: obj for obj in inputs}
    if missing := sorted(planned.keys() - given.keys()):
        raise BadInput(f"input {missing[0]} was part of the run at {output} but is missing now; {fix}")
    if added := sorted(given.keys() - planned.keys()):
        raise BadInput(f"input {added[0]} is not part of the run already planned at {output}; {fix}")
    for uri, obj in given.items():
        before = planned[uri]
        if obj != before:
            raise BadInput(
                f"input {uri} changed since the run at {output} was planned (size {before.size} -> "
                f"{obj.size}, version {before.version} -> {obj.version}); {fix}"
            )
    for name, value in settings.items():
        if plan.settings.get(name) != value:
            raise BadInput(
                f"--{name.replace('_', '-')} differs from the run at {output} "
                f"({plan.settings.get(name)} planned, {value} now); use the run's arguments or "
                "start a new run with another --output"
            )


def shard_records(plan: Plan, shard: Shard, endpoint_url: str | None) -> Iterator[Record]:
    """The shard's reads in order, repeats of earlier ids marked ``duplicate_id``."""
    duplicates = set(shard.duplicates)
    position = 0
    for segment in shard.segments:
        obj = plan.inputs[segment.input]
        if segment.offset is not None:  # plain text: seek straight to the segment
            records = islice(read_records(obj, endpoint_url, segment.offset), segment.count)
        else:  # gzip: read from the start
            records = islice(read_records(obj, endpoint_url), segment.start, segment.start + segment.count)
        for record in records:
            if position in duplicates:
                record = replace(record, status="duplicate_id")
            yield record
            position += 1
