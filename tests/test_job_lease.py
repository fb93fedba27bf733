"""Leases: expiry by the observer's own clock, so clock offsets between machines change nothing."""
from __future__ import annotations

import threading
import time

import pytest

from job.lease import Claim, ExpiryObserver, Renewer, claim
from job.store import LocalStore, Store, open_store
from job_support import bucket, s3_endpoint  # noqa: F401 (fixtures)

KEY = "_run/planner.json"


class FakeClock:
    """A monotonic clock that moves only when told: each 'machine' of a test has its own."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> Store:  # noqa: ANN001
    if request.param == "local":
        return LocalStore(str(tmp_path / "out"))
    return open_store(f"s3://{request.getfixturevalue('bucket')}/run")


def test_a_record_seen_unchanged_for_its_lease_is_expired() -> None:
    clock = FakeClock(1000.0)
    observer = ExpiryObserver(clock)
    assert observer.see("k", None, None, 10) == 0.0  # no record: free
    assert observer.see("k", '"e1"', None, 10) == 0.0  # released: free at once
    assert observer.see("k", '"e1"', "other", 10) == 10.0  # first sighting starts the count
    clock.advance(6)
    assert observer.see("k", '"e1"', "other", 10) == 4.0 and observer.remaining("k") == 4.0
    assert observer.see("k", '"e2"', "other", 10) == 10.0  # renewed: counted afresh
    clock.advance(10)
    assert observer.see("k", '"e2"', "other", 10) == 0.0 and observer.holder("k") == "other"


@pytest.mark.parametrize("skew", [-100.0, -30.0, 0.0, 30.0, 100.0])  # up to 10x the 10 s lease
def test_clock_skew_between_processes_changes_nothing(store: Store, skew: float, monkeypatch) -> None:  # noqa: ANN001
    """A holder that keeps renewing is never taken over, and a silent one is after one lease,
    whatever the two processes' clocks read. Wall time is shifted too: it is never used."""
    holder_clock, rival_clock = FakeClock(5_000.0), FakeClock(5_000.0 + skew)
    holder_obs, rival_obs = ExpiryObserver(holder_clock), ExpiryObserver(rival_clock)
    lease = claim(store, KEY, "holder", 10.0, holder_obs)
    assert lease is not None
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + skew * 7)  # whatever wall clocks say
    for _ in range(12):  # 40 s of renewals every lease/3 (both clocks tick alike)
        assert claim(store, KEY, "rival", 10.0, rival_obs) is None
        assert 0 < rival_obs.remaining(KEY) <= 10.0
        holder_clock.advance(10 / 3)
        rival_clock.advance(10 / 3)
        assert lease.renew()
    for _ in range(3):  # the holder goes silent (stopped, lost): one lease later it is taken
        assert claim(store, KEY, "rival", 10.0, rival_obs) is None
        rival_clock.advance(3.5)
    heir = claim(store, KEY, "rival", 10.0, rival_obs)
    assert heir is not None and heir.state.taken_over == 1 and heir.state.owner == "rival"
    assert not lease.renew() and lease.lost.is_set()  # the old holder is fenced
    assert not lease.release() and Claim.from_json(store.get(KEY).data).owner == "rival"


def test_a_released_lease_is_free_at_once_and_not_counted_as_taken_over(store: Store) -> None:
    first = claim(store, KEY, "a", 60.0, ExpiryObserver())
    assert first is not None and first.release()
    assert not first.renew()  # nothing is written after a release
    second = claim(store, KEY, "b", 60.0, ExpiryObserver())
    assert second is not None and second.state.taken_over == 0


def test_one_of_many_racing_takers_wins(store: Store) -> None:
    won = []
    barrier = threading.Barrier(6)

    def take(n: int) -> None:
        barrier.wait()
        if claim(store, KEY, f"t{n}", 60.0, ExpiryObserver()) is not None:
            won.append(n)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and Claim.from_json(store.get(KEY).data).owner == f"t{won[0]}"


def test_renewer_renews_every_third_of_a_lease_and_reports_a_refusal(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    lease = claim(store, KEY, "a", 0.3, ExpiryObserver())
    logged: list[tuple[str, dict]] = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            logged.append((event, fields))

        info = warning

    etags = []
    with Renewer(lease, Log()) as renewer:
        assert renewer.interval == pytest.approx(0.1)
        for _ in range(3):
            time.sleep(0.1)
            etags.append(store.get(KEY).etag)
        assert len(set(etags)) >= 2  # renewed while we watched
        thief = Claim(owner="thief", lease_seconds=9).to_json()
        # Taken behind its back. A renewal between our read and our write refuses the theft:
        # read again.
        deadline = time.monotonic() + 5
        while store.replace(KEY, thief, store.get(KEY).etag) is None:
            assert time.monotonic() < deadline, "every theft lost to a renewal"
        deadline = time.monotonic() + 5
        while not lease.lost.is_set():
            assert time.monotonic() < deadline, "the refused renewal was not noticed"
            time.sleep(0.02)
    assert any(event == "lease_renewal_refused" for event, _ in logged)
    assert Claim.from_json(store.get(KEY).data).owner == "thief"


def test_a_waiter_says_whom_it_waits_for_and_how_long(tmp_path) -> None:  # noqa: ANN001
    store = LocalStore(str(tmp_path))
    assert claim(store, KEY, "holder", 100.0, ExpiryObserver()) is not None
    clock = FakeClock(0.0)
    observer = ExpiryObserver(clock)
    lines: list[tuple[str, dict]] = []

    class Log:
        def info(self, event: str, **fields: object) -> None:
            lines.append((event, fields))

    assert claim(store, KEY, "me", 100.0, observer) is None
    observer.log_waiting(Log(), "waiting_for_planner", KEY)
    clock.advance(10)
    observer.log_waiting(Log(), "waiting_for_planner", KEY)  # too soon to repeat
    clock.advance(25)
    observer.log_waiting(Log(), "waiting_for_planner", KEY)
    assert [fields["seconds_left"] for _, fields in lines] == [100.0, 65.0]
    assert lines[0][0] == "waiting_for_planner" and lines[0][1]["holder"] == "holder"
