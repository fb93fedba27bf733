"""Leases: one holder at a time for a record in the store, whatever the machines' clocks say.

A lease is a record (a shard's record, the merge claim `_run/merge.json`, the planner claim
`_run/planner.json`) that names its `owner` and the `lease_seconds` within which the owner
promises to write it again. Two conditional writes decide every race:

- taking the record is `Store.create` (no record yet) or `Store.replace` on the ETag the
  taker just read and judged free: of several takers of one version, exactly one wins;
- every later write of the holder (renew, commit, release) is `Store.replace` on the ETag
  it wrote last: once anyone else has written the record, the old holder's writes are all
  refused (it is fenced), and the refusal is how it learns that it lost the lease.

Retries are safe: every version carries a fresh nonce, so its body is unique, and `Store`
reports a refused write whose stored body is ours (a retry after a lost response) as ours.

Expiry is judged by the observer, never by comparing clocks across machines. A record held
by someone else counts as expired once this process has seen the very same version (ETag)
for `lease_seconds` as its own monotonic clock measures it, the rule of Kubernetes' leader
election. A holder that keeps renewing (every `lease_seconds / 3`) changes the ETag before
any observer's count runs out, so a live holder's lease cannot be taken over; a holder
stopped, cut off or dead for longer than its lease is taken over, and fenced as above. A
released lease (no owner) is free at once. Wall-clock offsets between machines therefore do
not matter at all; what remains assumed is that clocks *tick* at roughly the same rate
(within the factor 3 between renewal interval and lease) and that a store write completes
well within a lease. Wall time (`renewed_at`) is written for people (`virnucpro status`),
never read for a decision.

    observer = ExpiryObserver()                      # one per process; clock injectable
    lease = claim(store, "_run/planner.json", me, 30.0, observer)
    if lease is None:                                # someone else holds it
        observer.log_waiting(log, "waiting_for_planner", "_run/planner.json")
    else:
        with Renewer(lease, log):                    # renews every lease_seconds / 3
            ...                                      # work; check lease.lost before publishing
        lease.release()
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from job.store import Store

Clock = Callable[[], float]  # seconds; only differences between two readings are used
WAIT_LOG_SECONDS = 30.0  # a waiter repeats its "waiting" line this often


class LeaseRecord(Protocol):
    """What a record must have to be leased: its owner, its lease, a way to be written."""

    owner: str | None
    lease_seconds: float

    def to_json(self) -> bytes: ...
    def written(self, **changes: Any) -> Any: ...  # the next version, with a fresh nonce


R = TypeVar("R", bound=LeaseRecord)


@dataclass
class _Sighting:
    etag: str
    owner: str
    lease_seconds: float
    since: float  # this process's clock when it first saw this version


class ExpiryObserver:
    """Judges other holders' leases by how long this process has seen their record unchanged.

    Thread-safe; one per process is enough (the key tells the records apart).
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._seen: dict[str, _Sighting] = {}
        self._logged: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def see(self, key: str, etag: str | None, owner: str | None, lease_seconds: float) -> float:
        """Record a sighting of `key`; returns the seconds until it counts as expired (0: free now).

        A record that does not exist or has no owner is free. A held one is free once the same
        ETag has been seen for `lease_seconds`, counted from the first sighting of that ETag.
        """
        with self._lock:
            if etag is None or owner is None:
                self._seen.pop(key, None)
                return 0.0
            now = self.clock()
            seen = self._seen.get(key)
            if seen is None or seen.etag != etag:
                seen = self._seen[key] = _Sighting(etag, owner, lease_seconds, now)
            return max(0.0, seen.since + seen.lease_seconds - now)

    def remaining(self, key: str) -> float:
        """Seconds left on the lease last seen on `key` (0 when it was free or never seen)."""
        with self._lock:
            seen = self._seen.get(key)
            return 0.0 if seen is None else max(0.0, seen.since + seen.lease_seconds - self.clock())

    def holder(self, key: str) -> str | None:
        """The owner last seen holding `key`, if any."""
        with self._lock:
            seen = self._seen.get(key)
            return None if seen is None else seen.owner

    def log_waiting(self, log: Any, event: str, key: str, **fields: object) -> None:
        """Say that this process waits for `key`'s holder and how long at most: when a new
        holder or version is seen, then every WAIT_LOG_SECONDS."""
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                return
            now = self.clock()
            last = self._logged.get(key)
            if last is not None and last[0] == seen.owner and now - last[1] < WAIT_LOG_SECONDS:
                return
            self._logged[key] = (seen.owner, now)
            left = max(0.0, seen.since + seen.lease_seconds - now)
        log.info(
            event, key=key, holder=seen.owner, seconds_left=round(left, 1),
            message=f"{seen.owner} holds it; taken over if it is not renewed within {left:.0f} s",
        )


class Lease(Generic[R]):
    """A held lease: the record as this holder last wrote it, and that version's ETag.

    Every write is a compare-and-swap on the ETag. The first refused write sets `lost`; from
    then on, and after `release`, nothing more is written.
    """

    def __init__(self, store: Store, key: str, state: R, etag: str) -> None:
        self.store, self.key, self.state, self.etag = store, key, state, etag
        self.lost = threading.Event()
        self.released = False
        self._lock = threading.Lock()

    @property
    def lease_seconds(self) -> float:
        return self.state.lease_seconds

    def write(self, **changes: object) -> bool:
        """Write the next version with `changes`; False when the lease is no longer ours."""
        with self._lock:
            return self._write_locked(**changes)

    def update(self, change: Callable[[R], dict[str, object]]) -> bool:
        """Write the next version with the changes `change` computes from the current one,
        atomically with respect to this lease's other writes (e.g. appending to a list)."""
        with self._lock:
            return self._write_locked(**change(self.state))

    def renew(self, **changes: object) -> bool:
        return self.write(renewed_at=time.time(), **changes)

    def release(self, **changes: object) -> bool:
        """Give the lease back (free at once for everyone); no later write of ours happens."""
        with self._lock:
            released = self._write_locked(owner=None, **changes)
            self.released = True
            return released

    def _write_locked(self, **changes: object) -> bool:
        if self.lost.is_set() or self.released:
            return False
        new = self.state.written(**changes)
        etag = self.store.replace(self.key, new.to_json(), self.etag)
        if etag is None:
            self.lost.set()
            return False
        self.state, self.etag = new, etag
        return True


L = TypeVar("L", bound=Lease)


def take(store: Store, key: str, state: R, etag: str | None, kind: type[L] = Lease) -> L | None:  # type: ignore[assignment]
    """Write `state` (a version naming its new owner) over the version `etag` that the caller
    read and judged free (None: there was no record). The lease (of class `kind`), or None
    when another writer changed the record first."""
    data = state.to_json()
    new_etag = store.create(key, data) if etag is None else store.replace(key, data, etag)
    return None if new_etag is None else kind(store, key, state, new_etag)


@dataclass(frozen=True)
class Claim:
    """The record of a plain claim (the merge, the planner): who holds it, nothing else."""

    owner: str | None = None
    lease_seconds: float = 0.0
    renewed_at: float = 0.0  # the holder's wall clock, for people only
    taken_over: int = 0  # holders lost (their lease expired unreleased)
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Claim:
        return cls(**json.loads(data))

    def written(self, **changes: Any) -> Claim:
        return replace(self, nonce=uuid.uuid4().hex, **changes)


def claim(store: Store, key: str, owner: str, lease_seconds: float, observer: ExpiryObserver) -> Lease[Claim] | None:
    """Take the plain claim at `key` when nobody holds it, its holder released it, or its
    holder's lease expired (as `observer` judges); None while someone else holds it
    (`observer.remaining(key)` then says for how long at most)."""
    stored = store.get(key)
    current = Claim() if stored is None else Claim.from_json(stored.data)
    etag = None if stored is None else stored.etag
    if observer.see(key, etag, current.owner, current.lease_seconds) > 0:
        return None
    taken_over = current.taken_over + (current.owner is not None)
    new = current.written(owner=owner, lease_seconds=lease_seconds, renewed_at=time.time(), taken_over=taken_over)
    return take(store, key, new, etag)


class Renewer(threading.Thread):
    """Renews a lease every `lease_seconds / 3` until stopped; the one renewal loop of every holder.

    A refused renewal means the lease was lost (`lease.lost` is set, logged once) and ends the
    loop; a failed one (the store did not answer) is logged and retried at the next interval.
    Subclasses add fields to each renewal (`changes`) or act after one (`renewed`).
    Usable as a context manager: started on entry, stopped on exit.
    """

    def __init__(self, lease: Lease, log: Any) -> None:
        super().__init__(daemon=True, name=f"renew {lease.key}")
        self.lease, self.log = lease, log
        self.interval = lease.lease_seconds / 3
        self._stopped = threading.Event()

    def changes(self) -> dict[str, object]:
        return {}

    def renewed(self) -> None:
        pass

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            if self.lease.released:
                return
            try:
                if not self.lease.renew(**self.changes()):
                    if self.lease.lost.is_set():
                        self.log.warning("lease_renewal_refused", key=self.lease.key,
                                         message="another process took this lease over")
                    return
            except Exception as exc:  # noqa: BLE001 - retried at the next interval; writes stay fenced
                self.log.warning("lease_renewal_failed", key=self.lease.key, error=f"{type(exc).__name__}: {exc}")
                continue
            self.renewed()

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def __enter__(self) -> Renewer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
