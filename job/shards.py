"""A shard's record: who holds its lease, and which parts of its results are committed.

Lease and progress live in one object per shard, so that one compare-and-swap decides both:
a worker holds the shard while the ETag it last wrote is still the object's ETag (see
job/lease.py for why the two conditional writes decide every race and retries are safe).
Renewing the lease, committing a part, releasing and failing are all `replace(..., etag)`.
A worker whose lease expired and was taken over holds a stale ETag: every later write of it
is refused, so it can never commit, and it learns that it lost the shard.

States: pending (no record, or released), leased (owner set), done, failed. Only errors
count towards `--max-attempts`: a shard is failed after that many attempts raised (or their
worker was killed from outside, see `charge_dead_worker`). Interruptions (a signal, a spot
notice, a lease taken over from a lost machine) are counted but never fail a shard.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from job.lease import ExpiryObserver, Lease, take
from job.store import Store

SHARDS_PREFIX = "_run/shards/"


def shard_key(index: int) -> str:
    return f"{SHARDS_PREFIX}{index:05d}.json"


@dataclass(frozen=True)
class Part:
    """A committed slice of a shard's results: the next `reads` reads after the previous parts."""

    rows: str  # key of the part's rows (job/parts.py)
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
    lease_seconds: float = 0.0  # the owner renews within this (see job/lease.py)
    renewed_at: float = 0.0  # the owner's wall clock at its last write: for `status` only
    processed: int = 0  # reads the owner reported done, committed or not (for work redone)
    parts: tuple[Part, ...] = ()
    done: bool = False
    failed: bool = False
    errors: tuple[str, ...] = ()  # one per attempt that raised (or whose worker was killed)
    retried_errors: tuple[str, ...] = ()  # errors of the attempts before a --retry-failed
    lost: int = 0  # leases taken over after they expired unreleased (machine lost or hung)
    redone_reads: int = 0  # reads processed again because their worker stopped before committing them
    device: str | None = None
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def reads_done(self) -> int:
        return sum(part.reads for part in self.parts)

    @property
    def interruptions(self) -> int:
        """Claims that resumed the shard after its worker stopped or was lost (not after an error)."""
        return max(0, self.attempt - 1 - len(self.errors) - len(self.retried_errors))

    @property
    def final(self) -> bool:
        return self.done or self.failed

    def held(self, now: float) -> bool:
        """Whether it looks held at wall time `now`: for display (`status`) only, as it compares
        this machine's clock with the holder's; claims judge expiry with an ExpiryObserver."""
        return self.owner is not None and not self.final and self.renewed_at + self.lease_seconds > now

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardState:
        body = json.loads(data)
        body["parts"] = tuple(Part(**part) for part in body["parts"])
        body["errors"] = tuple(body["errors"])
        body["retried_errors"] = tuple(body["retried_errors"])
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


class ShardLease(Lease[ShardState]):
    """One worker's hold on a shard. Every write is a compare-and-swap on the ETag it holds."""

    def renew(self, processed: int) -> bool:  # type: ignore[override]
        return super().renew(processed=processed)

    def commit(self, part: Part, shard_reads: int) -> bool:
        """Add a part; the part that completes the shard also marks it done and frees it, and
        this lease writes nothing more (no renewal or release rewrites a finished record)."""

        def changes(state: ShardState) -> dict[str, object]:
            reads = state.reads_done + part.reads
            done = reads == shard_reads
            return {
                "parts": state.parts + (part,), "processed": max(state.processed, reads), "done": done,
                "owner": None if done else state.owner, "renewed_at": time.time(),
            }

        committed = self.update(changes)
        if committed and self.state.done:
            self._close()
        return committed

    def release(self, processed: int = 0) -> bool:  # type: ignore[override]
        """Give the shard back unfinished (the worker is stopping); its parts stay committed.
        `processed`: the reads scored so far, committed or not (the next holder counts the
        uncommitted ones as redone)."""
        return super().release(processed=max(self.state.processed, processed))

    def fail(self, error: str, max_attempts: int) -> bool:
        """Record a failed attempt; after `max_attempts` of them the shard is failed for good."""
        return self.update(lambda state: _failed(state, error, max_attempts)) and self._close()

    def _close(self) -> bool:
        self.released = True
        return True


def _failed(state: ShardState, error: str, max_attempts: int) -> dict[str, object]:
    errors = state.errors + (error,)
    return {"errors": errors, "failed": len(errors) >= max_attempts, "owner": None}


def claim(
    store: Store,
    index: int,
    owner: str,
    lease_seconds: float,
    device: str,
    observer: ExpiryObserver,
) -> ShardLease | None:
    """Take the shard when it is pending, released, or its holder's lease expired as
    `observer` judges it; None when it is final or held (then `observer.remaining(key)`
    says for how long at most).

    A lease that expired unreleased means its worker (or machine) was lost: that is counted
    in `lost`, and is not an error: it never fails the shard.
    """
    key = shard_key(index)
    state, etag = read_shard(store, index)
    if state.final or observer.see(key, etag, state.owner, state.lease_seconds) > 0:
        return None
    changes: dict[str, object] = {
        "owner": owner, "attempt": state.attempt + 1, "lease_seconds": lease_seconds,
        "renewed_at": time.time(), "device": device,
    }
    if state.attempt:  # someone worked on it before and did not finish
        changes["redone_reads"] = state.redone_reads + max(0, state.processed - state.reads_done)
        changes["processed"] = state.reads_done
    if state.owner is not None:  # its lease expired unreleased: the worker was lost
        changes["lost"] = state.lost + 1
    return take(store, key, state.written(**changes), etag, ShardLease)


def charge_dead_worker(store: Store, indices: range, owner_prefix: str, error: str, max_attempts: int) -> list[int]:
    """Record `error` on the shards held by an owner named `owner_prefix...`, and free them at once: called by the
    parent for a worker that was killed from outside (the OOM killer), so that a shard
    whose reads kill every worker fails after `max_attempts` instead of looping forever.
    Returns the shards charged; a record changed meanwhile by someone else is left alone."""
    charged = []
    for index in indices:
        state, etag = read_shard(store, index)
        if not (state.owner or "").startswith(owner_prefix) or state.final or etag is None:
            continue
        new = state.written(**_failed(state, error, max_attempts))
        if store.replace(shard_key(index), new.to_json(), etag) is not None:
            charged.append(index)
    return charged


def reopen_failed(store: Store, indices: range) -> list[int]:
    """Make failed shards pending again (`--retry-failed`), keeping their committed parts:
    their errors move to `retried_errors` so they get `--max-attempts` fresh attempts."""
    reopened = []
    for index in indices:
        state, etag = read_shard(store, index)
        if not state.failed or etag is None:
            continue
        new = state.written(
            failed=False, owner=None, errors=(), retried_errors=state.retried_errors + state.errors,
        )
        if store.replace(shard_key(index), new.to_json(), etag) is not None:
            reopened.append(index)
    return reopened
