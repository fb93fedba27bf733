"""A shard's record: who holds its lease, and which parts of its results are committed.

Lease and progress live in one object per shard, so that one compare-and-swap decides both:
a worker holds the shard while the ETag it last wrote is still the object's ETag. Renewing
the lease, committing a part, releasing and failing are all `replace(..., etag)`. A worker
whose lease expired and was taken over holds a stale ETag: every later write of it is
refused, so it can never commit, and it learns that it lost the shard.

States: pending (no record, or released), leased (owner set, not expired), done, failed.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from job.store import Store

SHARDS_PREFIX = "_run/shards/"


def shard_key(index: int) -> str:
    return f"{SHARDS_PREFIX}{index:05d}.json"


@dataclass(frozen=True)
class Part:
    """A committed slice of a shard's results: the next `reads` reads after the previous parts."""

    rows: str  # key of the part's rows (JSON)
    features: str | None  # key of its feature matrix (.npy), with --write-features
    reads: int
    frames: int
    seconds: float  # worker time spent computing it
    committed_at: float
    device: str  # cpu, cuda, ...: GPU seconds are the seconds of parts computed on a GPU


@dataclass(frozen=True)
class ShardState:
    index: int
    owner: str | None = None
    attempt: int = 0  # how many times the shard was claimed
    expires: float = 0.0  # wall-clock end of the owner's lease
    processed: int = 0  # reads the owner reported done, committed or not (for work redone)
    parts: tuple[Part, ...] = ()
    done: bool = False
    failed: bool = False
    errors: tuple[str, ...] = ()  # one per attempt that raised
    lost: int = 0  # leases that expired without being released (worker killed or hung)
    redone_reads: int = 0  # reads processed again because their worker stopped before committing them
    device: str | None = None
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def reads_done(self) -> int:
        return sum(part.reads for part in self.parts)

    @property
    def interruptions(self) -> int:
        """Claims that resumed the shard after its worker stopped or was lost (not after an error)."""
        return max(0, self.attempt - 1 - len(self.errors))

    @property
    def final(self) -> bool:
        return self.done or self.failed

    def leased(self, now: float) -> bool:
        return self.owner is not None and self.expires > now and not self.final

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardState:
        body = json.loads(data)
        body["parts"] = tuple(Part(**part) for part in body["parts"])
        body["errors"] = tuple(body["errors"])
        return cls(**body)

    def written(self, **changes: object) -> ShardState:
        """A new version of the record, with a fresh nonce so its body is unique."""
        return replace(self, nonce=uuid.uuid4().hex, **changes)  # type: ignore[arg-type]


def read_shard(store: Store, index: int) -> tuple[ShardState, str | None]:
    """The shard's record and ETag; a shard nobody claimed yet is pending with no ETag."""
    stored = store.get(shard_key(index))
    if stored is None:
        return ShardState(index), None
    return ShardState.from_json(stored.data), stored.etag


class Lease:
    """One worker's hold on a shard. Every write is a compare-and-swap on the ETag it holds."""

    def __init__(self, store: Store, state: ShardState, etag: str) -> None:
        self.store, self.state, self.etag = store, state, etag
        self.lost = threading.Event()  # set once a write is refused: another worker has the shard
        self._lock = threading.Lock()

    def renew(self, lease_seconds: float, processed: int) -> bool:
        return self._write(expires=time.time() + lease_seconds, processed=processed)

    def commit(self, part: Part, lease_seconds: float, shard_reads: int) -> bool:
        """Add a part; the part that completes the shard also marks it done and frees it."""
        with self._lock:
            reads = self.state.reads_done + part.reads
            done = reads == shard_reads
            return self._write_locked(
                parts=self.state.parts + (part,),
                processed=max(self.state.processed, reads),
                done=done,
                owner=None if done else self.state.owner,
                expires=time.time() + lease_seconds,
            )

    def release(self) -> bool:
        """Give the shard back unfinished (the worker is stopping); its parts stay committed."""
        return self._write(owner=None, expires=0.0)

    def fail(self, error: str, max_attempts: int) -> bool:
        """Record a failed attempt; after `max_attempts` of them the shard is failed for good."""
        with self._lock:
            errors = self.state.errors + (error,)
            return self._write_locked(
                errors=errors, failed=len(errors) >= max_attempts, owner=None, expires=0.0
            )

    def _write(self, **changes: object) -> bool:
        with self._lock:
            return self._write_locked(**changes)

    def _write_locked(self, **changes: object) -> bool:
        if self.lost.is_set():
            return False
        new = self.state.written(**changes)
        etag = self.store.replace(shard_key(new.index), new.to_json(), self.etag)
        if etag is None:
            self.lost.set()
            return False
        self.state, self.etag = new, etag
        return True


def claim(
    store: Store,
    index: int,
    owner: str,
    lease_seconds: float,
    max_attempts: int,
    device: str,
) -> Lease | None:
    """Take the shard when it is pending or its lease expired; None when it is not free.

    A lease that expired without release means its worker was killed or hung; after
    `max_attempts` such losses the shard is failed instead of being handed out again.
    """
    state, etag = read_shard(store, index)
    now = time.time()
    if state.final or state.leased(now):
        return None
    changes: dict[str, object] = {
        "owner": owner, "attempt": state.attempt + 1, "expires": now + lease_seconds, "device": device,
    }
    if state.attempt:  # someone worked on it before and did not finish
        changes["redone_reads"] = state.redone_reads + max(0, state.processed - state.reads_done)
        changes["processed"] = state.reads_done
    if state.owner is not None:  # its lease expired: the worker was lost
        lost = state.lost + 1
        changes["lost"] = lost
        if lost >= max_attempts:
            message = f"the worker holding this shard was lost {lost} times (killed, out of memory or hung)"
            failed = state.written(
                owner=None, expires=0.0, lost=lost, failed=True, errors=state.errors + (message,)
            )
            _write_claim(store, failed, etag)
            return None
    new = state.written(**changes)
    new_etag = _write_claim(store, new, etag)
    return None if new_etag is None else Lease(store, new, new_etag)


def _write_claim(store: Store, state: ShardState, etag: str | None) -> str | None:
    data = state.to_json()
    if etag is None:
        return store.create(shard_key(state.index), data)
    return store.replace(shard_key(state.index), data, etag)
