"""How far a run is: shards done, leased, pending and failed, throughput and ETA.

Used by `virnucpro status` and by the running job's periodic progress line. It only reads
the plan and the shard records, so it can be run from anywhere, at any time. While the plan
is still being made, the shards and reads are those published so far, and the run's reads
are estimated from the share of input bytes scanned. "Leased" and
reads/s compare the holders' wall times with this machine's clock: for display only (the
job itself never compares clocks, see job/lease.py).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from tqdm import tqdm

from job.lease import Claim
from job.merge import MERGE_KEY, read_marker
from job.plan import PLANNER_KEY, Plan, load_plan
from job.shards import ShardState, read_shard
from job.store import Store

RATE_WINDOW_SECONDS = 300.0


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    shards: int
    done: int
    leased: int
    pending: int
    failed: int
    reads: int  # while planning: an estimate from the bytes scanned so far
    reads_committed: int
    reads_per_s: float | None  # committed reads per second over the last few minutes
    eta_s: float | None
    finished: str | None  # _SUCCESS or _FAILED once the run is finished
    planned: bool = True  # the plan is complete
    elapsed_s: float = 0.0  # since the run was planned (a finished run: to its last commit)
    scanned: float = 1.0  # share of the input bytes the planner has read
    error: str | None = None  # the plan stopped on malformed input: the run cannot go on
    idle: bool = False  # work is left and no shard is leased: no job is working on the run

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def state(self) -> str:
        """The marker once finished; else stopped by bad input, idle, planning or running."""
        if self.finished:
            return self.finished
        if self.error:
            return "stopped by bad input"
        if self.idle:
            return "idle"
        return "running" if self.planned else f"planning {100 * self.scanned:.0f}%"

    def bar(self, width: int = 100) -> str:
        """One progress-bar line (tqdm's): reads committed of all, percent, reads/s, ETA."""
        rate = f"{self.reads_per_s:.1f} reads/s" if self.reads_per_s is not None else "- reads/s"
        eta = "-" if self.eta_s is None else tqdm.format_interval(self.eta_s)
        return tqdm.format_meter(
            self.reads_committed, max(self.reads, self.reads_committed), self.elapsed_s, ncols=width,
            prefix=f"{self.run_id} {self.state}", unit="reads",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} reads [" + f"{rate}, ETA {eta}" + "]",
        )

    def line(self) -> str:
        rate = "-" if self.reads_per_s is None else f"{self.reads_per_s:.1f} reads/s"
        eta = "-" if self.eta_s is None else f"{self.eta_s:.0f} s"
        if self.error:
            return f"run {self.run_id}: stopped by bad input: {self.error}"
        idle = ("idle (every shard final, no merge at work; to merge, rerun the same command)"
                if self.planned and not self.pending else "idle (no shard is leased: no job at work, or one still starting; to resume, rerun the same command)")
        state = self.finished or (idle if self.idle else "running")
        planning = "" if self.planned else f"; planning: {100 * self.scanned:.0f}% of the input scanned, reads estimated"
        return (
            f"run {self.run_id}: {state}{planning}; shards {self.done} done, {self.leased} leased, "
            f"{self.pending} pending, {self.failed} failed of {self.shards}; reads "
            f"{self.reads_committed}/{self.reads}; {rate}; ETA {eta}"
        )


def run_status(store: Store, plan: Plan | None = None) -> RunStatus | None:
    """The run's status, or None when there is no run under the store."""
    plan = plan or load_plan(store)
    if plan is None:
        return None
    watch = RunWatch(store, plan)
    try:
        return watch.look()
    finally:
        watch.close()


class RunWatch:
    """A run looked at again and again (the running job's progress): each look reads the
    shards published since the last one and the records of the shards not final yet, not
    the whole run again. At 10^8 reads (5,000 shards) a full look is 5,000 GETs, about 12 s
    of client CPU; a final shard (done or failed) stays final while the job runs."""

    def __init__(self, store: Store, plan: Plan, at_work: bool = False) -> None:
        """`at_work`: the job running the run is the one looking (see `summarize`)."""
        self.store, self.plan, self.at_work = store, plan, at_work
        self._final: dict[int, ShardState] = {}
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="status")

    def close(self) -> None:
        """Drop the shard reads not started yet: a look in flight then ends (CancelledError)
        after the reads already running, and the process can exit at once, where it would
        first have drained thousands of queued GETs (a stopped job, past its grace period)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def look(self) -> RunStatus:
        marker = read_marker(self.store)
        self.plan = load_plan(self.store, self.plan) or self.plan  # shards published since
        unsettled = [shard.index for shard in self.plan.shards if shard.index not in self._final]
        read = dict(zip(unsettled, self._pool.map(lambda index: read_shard(self.store, index)[0], unsettled)))
        self._final.update((index, state) for index, state in read.items() if state.final)
        states = [self._final[shard.index] if shard.index in self._final else read[shard.index]
                  for shard in self.plan.shards]
        outside = marker is None and not self.at_work  # whether a held claim tells anything
        return summarize(self.plan, states, None if marker is None else marker[0], at_work=self.at_work,
                         merge_renewed=self._held_until(MERGE_KEY) if outside else None,
                         planner_renewed=self._held_until(PLANNER_KEY) if outside and not self.plan.complete else None)

    def _held_until(self, key: str) -> float | None:
        """Until when the holder of the claim at `key` promised to renew it (its wall clock:
        for display only); None when nobody holds it."""
        stored = self.store.get(key)
        holder = None if stored is None else Claim.from_json(stored.data)
        return None if holder is None or holder.owner is None else holder.renewed_at + holder.lease_seconds


def summarize(
    plan: Plan, states: list[ShardState], finished: str | None, now: float | None = None, at_work: bool = False,
    merge_renewed: float | None = None, planner_renewed: float | None = None,
) -> RunStatus:
    """The run's figures. `merge_renewed` and `planner_renewed`: until when the holder of the
    merge claim, and of the planner claim, promised to renew it (None: no holder), which
    tell a run being merged or planned from one stopped before or during its merge or plan."""
    now = time.time() if now is None else now
    if finished is not None:  # the run's own span ends at its last commit, not when it is looked at
        now = min(now, max((part.committed_at for state in states for part in state.parts), default=now))
    committed = sum(state.reads_done for state in states)
    span = min(RATE_WINDOW_SECONDS, max(now - plan.created_at, 1e-9))
    recent = sum(
        part.reads for state in states for part in state.parts if part.committed_at >= now - span
    )
    rate = recent / span if recent else None
    remaining = sum(shard.reads - state.reads_done for shard, state in zip(plan.shards, states) if not state.final)
    leased = sum(state.held(now) for state in states)
    # Seen from outside (`virnucpro status`), work left and no lease means no one is at work
    # (stopped, or the machines reclaimed): no rate or ETA that look alive; so does a run
    # with every shard final, no merge claim held and no outputs. The job itself looks
    # `at_work`: between its start and its first claim nothing is leased either.
    merging = merge_renewed is not None and merge_renewed > now
    planning = planner_renewed is not None and planner_renewed > now
    idle = not at_work and finished is None and not leased and not plan.error and (
        (remaining > 0 or not merging) if plan.complete else not planning)
    if idle or plan.error:
        rate = None
    reads, scanned = plan.total_reads, 1.0
    if not plan.complete:
        done_bytes = plan.shards[-1].scanned if plan.shards else 0
        scanned = min(done_bytes / plan.input_bytes, 1.0) if plan.input_bytes else 0.0
        reads = round(plan.total_reads / scanned) if scanned else 0
        remaining += reads - plan.total_reads
    return RunStatus(
        run_id=plan.run_id,
        shards=len(states),
        done=sum(state.done for state in states),
        leased=leased,
        pending=sum(not state.final and not state.held(now) for state in states),
        failed=sum(state.failed for state in states),
        reads=reads,
        reads_committed=committed,
        reads_per_s=None if rate is None else round(rate, 2),
        eta_s=None if idle else 0.0 if not remaining else (None if rate is None else round(remaining / rate, 1)),
        finished=finished,
        planned=plan.complete,
        scanned=round(scanned, 4),
        elapsed_s=round(max(now - plan.created_at, 0.0), 1),
        error=plan.error,
        idle=idle,
    )
