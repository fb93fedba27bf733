"""Shard records: one holder at a time, takeover after expiry, a stale holder cannot commit."""
from __future__ import annotations

import time

from job.lease import ExpiryObserver
from job.shards import Part, charge_dead_worker, claim, read_shard, reopen_failed
from job.store import LocalStore
from test_job_lease import FakeClock


def part(reads: int, name: str = "p") -> Part:
    return Part(f"_run/parts/{name}.json", None, reads, reads * 2, 1.0, time.time(), "cpu")


def test_claim_commit_done(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    lease = claim(store, 0, "w1", 60, "cpu", ExpiryObserver())
    assert lease is not None and lease.state.attempt == 1
    assert claim(store, 0, "w2", 60, "cpu", ExpiryObserver()) is None  # leased
    assert lease.renew(processed=5)
    assert lease.commit(part(4), shard_reads=10)
    assert lease.commit(part(6), shard_reads=10)
    state, etag = read_shard(store, 0)
    assert state.done and state.owner is None and state.reads_done == 10
    assert lease.released and not lease.renew(processed=10) and not lease.release(10)  # done: no more writes
    assert read_shard(store, 0)[1] == etag
    assert claim(store, 0, "w2", 60, "cpu", ExpiryObserver()) is None  # done


def test_takeover_after_expiry_fences_the_old_holder(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    clock = FakeClock(0.0)
    heir_observer = ExpiryObserver(clock)
    zombie = claim(store, 0, "zombie", 5, "cpu", ExpiryObserver())
    assert zombie.commit(part(3, "z1"), shard_reads=10)
    assert zombie.renew(processed=7)  # 7 processed, 3 committed
    assert claim(store, 0, "heir", 60, "cpu", heir_observer) is None  # first sighting
    clock.advance(5)
    heir = claim(store, 0, "heir", 60, "cpu", heir_observer)
    assert heir is not None
    assert heir.state.lost == 1 and heir.state.interruptions == 1 and heir.state.redone_reads == 4
    assert heir.state.errors == ()  # a lost worker is not a failed attempt
    assert not zombie.commit(part(7, "z2"), shard_reads=10)  # stale ETag: refused
    assert zombie.lost.is_set() and not zombie.renew(10) and not zombie.release()
    assert heir.commit(part(7, "h1"), shard_reads=10)
    state, _ = read_shard(store, 0)
    assert state.done and [p.rows for p in state.parts] == ["_run/parts/z1.json", "_run/parts/h1.json"]


def test_release_then_resume_counts_an_interruption(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    first = claim(store, 0, "w1", 60, "cpu", ExpiryObserver())
    first.commit(part(2), shard_reads=5)
    assert first.release()
    second = claim(store, 0, "w2", 60, "cpu", ExpiryObserver())  # free at once
    assert second.state.reads_done == 2 and second.state.interruptions == 1 and second.state.lost == 0


def test_repeated_failures_fail_the_shard(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    for attempt in range(1, 4):
        lease = claim(store, 0, f"w{attempt}", 60, "cpu", ExpiryObserver())
        assert lease is not None
        assert lease.fail("RuntimeError: boom", max_attempts=3)
    state, _ = read_shard(store, 0)
    assert state.failed and state.errors == ("RuntimeError: boom",) * 3
    assert claim(store, 0, "w4", 60, "cpu", ExpiryObserver()) is None


def test_lost_workers_never_fail_the_shard(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    clock = FakeClock(0.0)
    observer = ExpiryObserver(clock)
    for n in range(5):  # more losses than --max-attempts
        assert claim(store, 0, f"doomed{n}", 1, "cpu", observer) is not None
        assert claim(store, 0, "next", 1, "cpu", observer) is None
        clock.advance(1)
    state, _ = read_shard(store, 0)
    assert not state.failed and state.lost == 4 and state.errors == ()


def test_a_killed_worker_is_charged_and_its_shard_freed(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    assert claim(store, 0, "host-41-abc", 60, "cpu", ExpiryObserver()) is not None
    assert claim(store, 1, "host-412-abc", 60, "cpu", ExpiryObserver()) is not None
    assert charge_dead_worker(store, range(2), "host-41-", "killed by SIGKILL", max_attempts=1) == [0]
    state, _ = read_shard(store, 0)
    assert state.failed and state.owner is None and state.errors == ("killed by SIGKILL",)
    assert read_shard(store, 1)[0].owner == "host-412-abc"  # another worker's shard is untouched


def test_reopen_failed_keeps_the_parts_and_gives_fresh_attempts(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    lease = claim(store, 0, "w", 60, "cpu", ExpiryObserver())
    lease.commit(part(2), shard_reads=5)
    lease.fail("RuntimeError: out of memory", max_attempts=1)
    assert reopen_failed(store, range(3)) == [0]
    state, _ = read_shard(store, 0)
    assert not state.failed and state.errors == () and state.retried_errors == ("RuntimeError: out of memory",)
    again = claim(store, 0, "w2", 60, "cpu", ExpiryObserver())
    assert again.state.reads_done == 2 and again.state.interruptions == 0
