"""The run's plan, published while it is being made: workers score shard 0 while the
planner is still reading the end of the input.

Layout under the run's prefix (every object written by conditional create, so of several
starters one wins and the others adopt it, and every body but the header's is a
deterministic function of the inputs: a planner that takes over from a dead one re-scans
from the start and re-creates identical objects):

- ``_run/plan.json``: the header (run id, input fingerprints, result-changing settings,
  reads per shard), written before any read is scanned;
- ``_run/planner.json``: the claim of the one process scanning the inputs (a renewed
  lease; another starter takes it over when it expires);
- ``_run/plan/shards/NNNNN.json``: each shard, published in order as soon as the scan has
  passed its last read: its segments (input, first read, count, byte range, first line)
  and which of its reads repeat an id met earlier in the run (``duplicate_id``);
- ``_run/inputs/NNNNN-S.gz``: for a gzip input, the shard's segment text, recompressed at
  ISA-L level 1, so that a worker reads only its own reads (deleted with the parts);
- ``_run/plan/done.json``: written last, with every shard's record and the totals;
- ``_run/plan/error.json``: instead, when the scan found malformed input (exit 65).

Why shard objects and not a gzip index (measured on this machine, 124 MB of FASTQ text,
see docs/PERFORMANCE.md): a restart-point index (indexed_gzip, 31 KB a point) decompresses
at the same speed as ISA-L (114 vs 108 MB/s of text) but is one growing object that
workers would need while it is still being written, and a worker would then inflate from
the point before its shard (up to the point spacing more). Recompressing each shard's text
with ISA-L level 1 costs the planner 396 MB/s of text (about a quarter of its
decompression time), produces objects of about the input's size, and a worker's reading
is then exactly its own reads: one GET, decompressed at ISA-L speed, for gzip, BGZF and
multi-member files alike. Plain inputs need no copy: workers read their byte range
(S3: a ranged GET pinned to the planned ETag).

Shard objects are written in order by one background thread (at most PUBLISH_AHEAD
waiting), so store latency and the recompression overlap the scan; a shard's record is
created only after its copies exist.

Reads per shard: `--shard-reads`, or automatic (`auto_shard_reads`): about TARGET_SHARDS
shards, between MIN_SHARD_READS and MAX_SHARD_READS reads each, from the inputs' total
size and the reads per byte of the first input's first MiB: the same for every starter,
and recorded in the header.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from typing import BinaryIO

import numpy as np
from isal import igzip, isal_zlib

from core.reads import GZIP_MAGIC, ReadsError, Record, read_records, with_mate
from core.scan import RecordScanner
from job.errors import BadInput, Interrupted
from job.inputs import InputChanged, InputObject, open_input, pair_mates, stat_input
from job.log import get_logger
from job.seen import SeenIds
from job.store import Store

PLAN_KEY = "_run/plan.json"
PLANNER_KEY = "_run/planner.json"
SHARD_PLANS = "_run/plan/shards/"
DONE_KEY = "_run/plan/done.json"
ERROR_KEY = "_run/plan/error.json"
INPUT_COPIES = "_run/inputs/"
SCAN_BLOCK = 4 * 2**20
SAMPLE_BYTES = 2**20
TARGET_SHARDS = 32
MIN_SHARD_READS = 500
MAX_SHARD_READS = 20_000
COPY_LEVEL = 1  # ISA-L level of the shard copies of gzip inputs
PUBLISH_AHEAD = 4  # shard objects waiting to be written while the scan goes on


@dataclass(frozen=True)
class Segment:
    """Reads `start` .. `start + count - 1` (0-based, file order) of input number `input`."""

    input: int
    start: int
    count: int
    offset: int  # byte offset of the first read in the input's text (decompressed)
    end: int  # byte offset just past the segment's last read
    line: int  # line number of the first read's header
    copy: str | None  # gzip input: key of the segment's text, recompressed, under the run


@dataclass(frozen=True)
class Shard:
    index: int
    segments: tuple[Segment, ...]
    reads: int
    duplicates: tuple[int, ...]  # positions within the shard of reads whose id came earlier
    scanned: int  # input bytes read by the planner when it published the shard (for the ETA)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "reads": self.reads,
            "segments": [[g.input, g.start, g.count, g.offset, g.end, g.line, g.copy] for g in self.segments],
            "duplicates": list(self.duplicates),
            "scanned": self.scanned,
        }

    @classmethod
    def from_dict(cls, body: dict) -> Shard:
        segments = tuple(Segment(*g) for g in body["segments"])
        return cls(body["index"], segments, body["reads"], tuple(body["duplicates"]), body["scanned"])


@dataclass(frozen=True)
class Plan:
    """The header, and the shards published so far (all of them once `complete`)."""

    run_id: str
    inputs: tuple[InputObject, ...]
    settings: dict
    shard_reads: int
    created_at: float
    shards: tuple[Shard, ...] = ()
    complete: bool = False
    empty_inputs: tuple[str, ...] = ()  # inputs that held no read (warned about)
    error: str | None = None  # the scan stopped on malformed input
    # per input, the mate its name gives it as a file of a pair (job.inputs.pair_mates), for
    # reads whose header gives none; () in a plan of a release before, where no file gave one
    mates: tuple[int, ...] = ()

    def mate(self, input_number: int) -> int:
        return self.mates[input_number] if self.mates else 0

    @property
    def total_reads(self) -> int:
        return sum(shard.reads for shard in self.shards)

    @property
    def input_bytes(self) -> int:
        return sum(obj.size for obj in self.inputs)

    def header_json(self) -> bytes:
        body = {
            "run_id": self.run_id,
            "created_at": self.created_at,
            "inputs": [obj.fingerprint() for obj in self.inputs],
            "settings": self.settings,
            "shard_reads": self.shard_reads,
            "mates": list(self.mates),
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_header(cls, data: bytes, output: str) -> Plan:
        body = json.loads(data)
        if "shards" in body:  # the plan of the release before the streaming plan: every shard in one file
            raise BadInput(
                f"the run at {output} was planned by an earlier version of virnucpro (one-file {PLAN_KEY}), "
                "which this version cannot resume or check: finish it with the version that started it, "
                "or start it again with another --output (a finished run's outputs are complete as they are)"
            )
        return cls(
            run_id=body["run_id"],
            inputs=tuple(InputObject(i["uri"], i["size"], i["version"]) for i in body["inputs"]),
            settings=body["settings"],
            shard_reads=body["shard_reads"],
            created_at=body["created_at"],
            mates=tuple(body.get("mates", ())),
        )


def shard_plan_key(index: int) -> str:
    return f"{SHARD_PLANS}{index:05d}.json"


def load_plan(store: Store, known: Plan | None = None) -> Plan | None:
    """The plan as far as it is published; `known` (an earlier answer) saves re-reading it."""
    plan = known
    if plan is None:
        header = store.get(PLAN_KEY)
        if header is None:
            return None
        plan = Plan.from_header(header.data, store.uri)
    if plan.complete or plan.error:
        return plan
    done = store.get(DONE_KEY)  # read before the shards: once it exists, every shard does
    if done is not None:
        body = json.loads(done.data)
        shards = tuple(Shard.from_dict(s) for s in body["shards"])
        return replace(plan, shards=shards, complete=True, empty_inputs=tuple(body["empty_inputs"]))
    if (error := store.get(ERROR_KEY)) is not None:
        return replace(plan, error=json.loads(error.data)["error"])
    shards = list(plan.shards)
    while (stored := store.get(shard_plan_key(len(shards)))) is not None:
        shards.append(Shard.from_dict(json.loads(stored.data)))
    return replace(plan, shards=tuple(shards))


def plan_header(
    store: Store, inputs: list[InputObject], settings: dict, shard_reads: int | None, endpoint_url: str | None
) -> Plan:
    """The run's plan header: the stored one (checked against these inputs and settings), else a new one."""
    stored = store.get(PLAN_KEY)
    if stored is None:
        reads = shard_reads or auto_shard_reads(inputs, endpoint_url)
        identity = json.dumps([[o.fingerprint() for o in inputs], settings, reads], sort_keys=True)
        run_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
        fresh = Plan(run_id, tuple(inputs), settings, reads, time.time(), mates=pair_mates(inputs))
        if store.create(PLAN_KEY, fresh.header_json()) is not None:
            return fresh
        stored = store.get(PLAN_KEY)  # another starter planned first: adopt its plan
        assert stored is not None
    plan = Plan.from_header(stored.data, store.uri)
    check_plan(plan, inputs, settings, store.uri, failed=store.get(ERROR_KEY) is not None)
    return plan


def plan_run(
    store: Store,
    inputs: list[InputObject],
    settings: dict,
    shard_reads: int | None,
    endpoint_url: str | None,
    stop: threading.Event,
) -> Plan:
    """Header and whole scan in the calling thread; the complete plan (tests, tools)."""
    header = plan_header(store, inputs, settings, shard_reads, endpoint_url)
    plan = load_plan(store, header)
    assert plan is not None
    if not plan.complete:
        Planner(store, header, endpoint_url, stop).scan()
        plan = load_plan(store, header)
    assert plan is not None
    if plan.error:
        raise BadInput(plan.error)
    return plan


def auto_shard_reads(inputs: list[InputObject], endpoint_url: str | None) -> int:
    """Reads per shard for about TARGET_SHARDS shards, from the first MiB of the first input
    that has reads: deterministic, so concurrent starters agree."""
    total = sum(obj.size for obj in inputs)
    for obj in inputs:
        raw, text = _sample(obj, endpoint_url)
        try:
            reads = len(RecordScanner(obj.uri).feed(text).offsets)
        except ReadsError as exc:
            raise BadInput(str(exc)) from None
        if reads:
            estimated = total * reads / raw
            return max(MIN_SHARD_READS, min(MAX_SHARD_READS, math.ceil(estimated / TARGET_SHARDS)))
    return MIN_SHARD_READS


def _sample(obj: InputObject, endpoint_url: str | None) -> tuple[int, bytes]:
    """(raw bytes read, up to SAMPLE_BYTES of the input's text) from its start."""
    with open_input(obj, endpoint_url, 0, min(obj.size, 4 * SAMPLE_BYTES)) as stream:
        raw = stream.read()
    if raw[:2] != GZIP_MAGIC:
        return min(len(raw), SAMPLE_BYTES), raw[:SAMPLE_BYTES]
    text, used = b"", 0
    while len(text) < SAMPLE_BYTES and raw[used:used + 2] == GZIP_MAGIC:  # each member (BGZF: many)
        inflate = zlib.decompressobj(31)
        try:
            text += inflate.decompress(memoryview(raw)[used:], SAMPLE_BYTES - len(text))
        except zlib.error:
            break  # a damaged stream: the plan pass names it
        used = len(raw) - len(inflate.unused_data) - len(inflate.unconsumed_tail)
        if not inflate.eof:
            break  # the sample is full, or the bytes read end inside this member
    return max(used, 1), text


def _read_text(text: BinaryIO, size: int) -> tuple[bytes, Exception | None]:
    """Up to `size` bytes of text, and the error that cut them short, if one did.

    Read in pieces, so that a damaged gzip stream still hands out the text before the damage
    and the error can name the line it follows, not a line up to `size` bytes earlier.
    """
    pieces, have = [], 0
    while have < size:
        try:
            piece = text.read(min(size - have, 2**16))
        except (OSError, EOFError, zlib.error, isal_zlib.error) as exc:
            return b"".join(pieces), exc
        if not piece:
            break
        pieces.append(piece)
        have += len(piece)
    return b"".join(pieces), None


def check_plan(plan: Plan, inputs: list[InputObject], settings: dict, output: str, failed: bool = False) -> None:
    """Refuse to resume a run whose inputs or result-changing arguments differ. `failed`: the
    run's plan stopped on malformed input, so a changed input is most likely the fixed one."""
    new_run = f"start a new run with another --output than {output}"
    if failed:
        new_run = f"the run at {output} stopped on bad input: run the fixed inputs with another --output (or delete {output})"
    planned = {obj.uri: obj for obj in plan.inputs}
    given = {obj.uri: obj for obj in inputs}
    if missing := sorted(planned.keys() - given.keys()):
        raise BadInput(f"input {missing[0]} was part of the run at {output} but is missing now; restore it, or {new_run}")
    if added := sorted(given.keys() - planned.keys()):
        raise BadInput(
            f"input {added[0]} is not part of the run already planned at {output}; leave it out, or {new_run}"
        )
    for uri, obj in given.items():
        before = planned[uri]
        if obj != before:
            how = f"size {before.size} -> {obj.size}" if obj.size != before.size else "modified, same size"
            raise BadInput(f"input {uri} changed since the run at {output} was planned ({how}); restore it, or {new_run}")
    for name, value in settings.items():
        if plan.settings.get(name) != value:
            raise BadInput(
                f"--{name.replace('_', '-')} differs from the run at {output} "
                f"({_setting(plan.settings.get(name))} planned, {_setting(value)} now); use the run's arguments or "
                "start a new run with another --output"
            )


def _setting(value: object) -> str:
    return "not given" if value is None else str(value)


class _Counted(io.RawIOBase):
    """A raw stream that counts the bytes read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream, self.count = stream, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001
        count = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        self.count += count
        return count

    def close(self) -> None:
        self._stream.close()
        super().close()


class Planner:
    """One pass over the inputs: cuts shards, finds repeated ids, publishes as it goes.

    Per block of text, the work is vectorised (RecordScanner's numpy offsets, SeenIds'
    digests); no Python object per read outlives its block.
    """

    def __init__(
        self, store: Store, plan: Plan, endpoint_url: str | None, stop: threading.Event,
        block_delay: float = 0.0, lost: threading.Event | None = None,
    ) -> None:
        self.store, self.plan, self.endpoint, self.stop = store, plan, endpoint_url, stop
        self.lost = lost  # set when another starter took the planner claim over: stop scanning
        self.block_delay = block_delay  # tests: slow the scan down to watch shards appear
        self.log = get_logger(run_id=plan.run_id)
        self.seen = SeenIds()
        self.shards: list[dict] = []
        self.empty: list[str] = []
        self._segments: list[Segment] = []
        self._duplicates: list[int] = []
        self._in_shard = 0
        self._scanned = 0  # input bytes consumed so far, all inputs
        self._publisher: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()

    def scan(self) -> None:
        """Scan every input and publish the plan; malformed input publishes the error instead."""
        started = time.monotonic()
        with ThreadPoolExecutor(1, thread_name_prefix="publish") as publisher:
            self._publisher = publisher
            try:
                for number, obj in enumerate(self.plan.inputs):
                    self._scan_input(number, obj)
            except (ReadsError, InputChanged) as exc:
                self._drain(0)
                self._publish_error(str(exc))
                return
            if self._in_shard:
                self._publish_shard()
            self._drain(0)
        reads = sum(shard["reads"] for shard in self.shards)
        body = {"shards": self.shards, "reads": reads, "empty_inputs": self.empty}
        self._create(DONE_KEY, json.dumps(body, separators=(",", ":")).encode())
        seconds = time.monotonic() - started
        self.log.info(
            "plan_complete", shards=len(self.shards), reads=reads, seconds=round(seconds, 2),
            reads_per_s=round(reads / max(seconds, 1e-9)), digest_mib=round(self.seen.nbytes / 2**20, 1),
        )

    def _submit(self, write: Callable[[], None]) -> None:
        """Publish in the background, in order (one thread): store latency and compression
        overlap the scan; at most PUBLISH_AHEAD writes wait."""
        self._pending.append(self._publisher.submit(write))
        self._drain(PUBLISH_AHEAD)

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.popleft().result()  # raises a failed write's error here

    def _publish_error(self, message: str) -> None:
        self.log.info("plan_failed", error=message)  # every starter that stops on it reports it as bad_input
        self.store.create(ERROR_KEY, json.dumps({"error": message}).encode())

    def _scan_input(self, number: int, obj: InputObject) -> None:
        counted = _Counted(open_input(obj, self.endpoint))
        raw = io.BufferedReader(counted, SCAN_BLOCK)
        gzip = raw.peek(2)[:2] == GZIP_MAGIC
        text: BinaryIO = igzip.GzipFile(fileobj=raw, mode="rb") if gzip else raw  # type: ignore[assignment]
        scanner = RecordScanner(obj.uri)
        mate = self.plan.mate(number)
        window = bytearray()  # gzip: the text from the open segment's first read on
        window_base = 0  # text offset of window[0]
        position = 0  # text bytes fed to the scanner
        reads = 0  # reads of this input so far
        open_segment: tuple[int, int, int] | None = None  # (first read, offset, line)
        full_at: int | None = None  # the shard filled at this read of the input: close it at the next
        base_scanned = self._scanned
        last_line = 1  # header line of the last record found (for a damaged gzip stream)
        try:
            while True:
                if self.stop.is_set():
                    raise Interrupted("stopped while planning")
                if self.lost is not None and self.lost.is_set():
                    raise Interrupted("another starter took the planner claim over")
                block, damage = _read_text(text, SCAN_BLOCK)
                if damage is not None:
                    if not gzip or (isinstance(damage, OSError) and damage.errno is not None):
                        raise damage  # the disk or the network, not the file
                    try:  # the text before the damage: name the last record that starts in it
                        lines = scanner.feed(block).lines
                        last_line = int(lines[-1]) if len(lines) else last_line
                    except ReadsError:
                        pass
                    raise ReadsError(
                        obj.uri, last_line, f"the gzip stream is damaged or truncated after this line ({damage})",
                        "Re-download or re-compress the file; check it with `gzip -t`.",
                    ) from None
                found = scanner.feed(block) if block else scanner.close()
                if gzip:
                    window += block
                self._scanned = base_scanned + counted.count
                offsets, lines, count = found.offsets, found.lines, len(found.offsets)
                if count:
                    last_line = int(lines[-1])
                repeats = self.seen.add(found.ids if not mate else [with_mate(i, mate) for i in found.ids])
                i = 0
                while i < count:
                    if full_at is not None:  # the filled shard ends where this read starts
                        window_base = self._close(number, open_segment, reads, int(offsets[i]), gzip, window, window_base)
                        open_segment, full_at = None, None
                    if open_segment is None:
                        open_segment = (reads, int(offsets[i]), int(lines[i]))
                        if gzip:
                            del window[: int(offsets[i]) - window_base]
                            window_base = int(offsets[i])
                    take = min(count - i, self.plan.shard_reads - self._in_shard)
                    self._duplicates.extend((np.nonzero(repeats[i:i + take])[0] + self._in_shard).tolist())
                    self._in_shard += take
                    reads += take
                    i += take
                    if self._in_shard == self.plan.shard_reads:
                        full_at = reads
                position += len(block)
                if not block:
                    break
                if self.block_delay:
                    time.sleep(self.block_delay)
        finally:
            raw.close()
        if open_segment is not None:
            self._close(number, open_segment, reads, position, gzip, window, window_base, full_at is not None)
        if not reads:
            self.empty.append(obj.uri)
            self.log.warning("empty_input", input=obj.uri, message="this input holds no reads")
        if stat_input(obj, self.endpoint) != obj:
            raise InputChanged(obj.uri)

    def _close(
        self, number: int, segment: tuple[int, int, int] | None, reads: int, end: int, gzip: bool,
        window: bytearray, window_base: int, shard_full: bool = True,
    ) -> int:
        """End the open segment at text offset `end`; publish the shard when it is full.
        Returns the new window base."""
        assert segment is not None
        first, offset, line = segment
        copy = None
        if gzip:  # gzip input: the segment's text becomes its own object
            copy = f"{INPUT_COPIES}{len(self.shards):05d}-{len(self._segments)}.gz"
            data = bytes(window[offset - window_base:end - window_base])
            key = copy
            self._submit(lambda: self._create(key, igzip.compress(data, COPY_LEVEL, mtime=0), must_match=False))
            del window[: end - window_base]
            window_base = end
        self._segments.append(Segment(number, first, reads - first, offset, end, line, copy))
        if shard_full:
            self._publish_shard()
        return window_base

    def _publish_shard(self) -> None:
        shard = Shard(len(self.shards), tuple(self._segments), self._in_shard, tuple(self._duplicates), self._scanned)
        body = shard.to_dict()
        data = json.dumps(body, separators=(",", ":")).encode()
        self._submit(lambda: self._create(shard_plan_key(shard.index), data))
        self.shards.append(body)
        self._segments, self._duplicates, self._in_shard = [], [], 0

    def _create(self, key: str, data: bytes, must_match: bool = True) -> None:
        if self.store.create(key, data) is None and must_match:
            raise RuntimeError(f"{self.store.uri}/{key} exists with other contents: a planner of other code?")


def shard_records(plan: Plan, shard: Shard, endpoint_url: str | None, store: Store) -> Iterator[Record]:
    """The shard's reads in order, repeats of earlier ids marked ``duplicate_id``."""
    duplicates = set(shard.duplicates)
    position = 0
    for segment in shard.segments:
        obj = plan.inputs[segment.input]
        with _segment_text(obj, segment, endpoint_url, store) as stream:
            mate = plan.mate(segment.input)
            for record in islice(read_records(stream, obj.uri, segment.line), segment.count):
                if mate:
                    record = replace(record, id=with_mate(record.id.encode(), mate).decode())
                if position in duplicates:
                    record = replace(record, status="duplicate_id")
                yield record
                position += 1


def _segment_text(obj: InputObject, segment: Segment, endpoint_url: str | None, store: Store) -> BinaryIO:
    if segment.copy is None:  # plain text: the segment's byte range
        return open_input(obj, endpoint_url, segment.offset, segment.end)
    stored = store.get(segment.copy)
    if stored is None:
        raise RuntimeError(f"{store.uri}/{segment.copy} (shard copy of {obj.uri}) is missing")
    return io.BytesIO(igzip.decompress(stored.data))
