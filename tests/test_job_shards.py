"""Shard records: one holder at a time, takeover after expiry, a stale holder cannot commit."""
from __future__ import annotations

import time

from job.shards import Part, claim, read_shard
from job.store import LocalStore


def part(reads: int, name: str = "p") -> Part:
    return Part(f"_run/parts/{name}.json", None, reads, reads * 2, 1.0, time.time(), "cpu")


def test_claim_commit_done(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    lease = claim(store, 0, "w1", 60, 3, "cpu")
    assert lease is not None and lease.state.attempt == 1
    assert claim(store, 0, "w2", 60, 3, "cpu") is None  # leased
    assert lease.renew(60, processed=5)
    assert lease.commit(part(4), 60, shard_reads=10)
    assert lease.commit(part(6), 60, shard_reads=10)
    state, _ = read_shard(store, 0)
    assert state.done and state.owner is None and state.reads_done == 10
    assert claim(store, 0, "w2", 60, 3, "cpu") is None  # done


def test_takeover_after_expiry_fences_the_old_holder(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    zombie = claim(store, 0, "zombie", 0.2, 3, "cpu")
    assert zombie.commit(part(3, "z1"), 0.2, shard_reads=10)
    assert zombie.renew(0.2, processed=7)  # 7 processed, 3 committed
    time.sleep(0.3)
    heir = claim(store, 0, "heir", 60, 3, "cpu")
    assert heir is not None
    assert heir.state.lost == 1 and heir.state.interruptions == 1 and heir.state.redone_reads == 4
    assert not zombie.commit(part(7, "z2"), 60, shard_reads=10)  # stale ETag: refused
    assert zombie.lost.is_set() and not zombie.renew(60, 10) and not zombie.release()
    assert heir.commit(part(7, "h1"), 60, shard_reads=10)
    state, _ = read_shard(store, 0)
    assert state.done and [p.rows for p in state.parts] == ["_run/parts/z1.json", "_run/parts/h1.json"]


def test_release_then_resume_counts_an_interruption(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    first = claim(store, 0, "w1", 60, 3, "cpu")
    first.commit(part(2), 60, shard_reads=5)
    assert first.release()
    second = claim(store, 0, "w2", 60, 3, "cpu")
    assert second.state.reads_done == 2 and second.state.interruptions == 1 and second.state.lost == 0


def test_repeated_failures_fail_the_shard(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    for attempt in range(1, 4):
        lease = claim(store, 0, f"w{attempt}", 60, 3, "cpu")
        assert lease is not None
        assert lease.fail("RuntimeError: boom", max_attempts=3)
    state, _ = read_shard(store, 0)
    assert state.failed and state.errors == ("RuntimeError: boom",) * 3
    assert claim(store, 0, "w4", 60, 3, "cpu") is None


def test_workers_lost_repeatedly_fail_the_shard(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    for _ in range(2):
        assert claim(store, 0, "doomed", 0.05, 2, "cpu") is not None
        time.sleep(0.1)
    assert claim(store, 0, "next", 60, 2, "cpu") is None
    state, _ = read_shard(store, 0)
    assert state.failed and "lost 2 times" in state.errors[-1]
