"""Run-wide duplicate ids (job/seen.py) at scale: time and peak memory of SeenIds.add.

Not a test: it prints figures, recorded with their command in docs/PERFORMANCE.md.

    python benchmarks/seen_ids.py --ids 10000000

Adds `--ids` distinct Illumina-style ids (45 characters) in batches of `--batch`, as the
planner does, and prints the seconds spent in `add`, the slowest batch (the planner stalls
that long), the digests' size and the process's peak RSS (the interpreter and the ids of
one batch included).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job.seen import SeenIds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=20_000)
    args = parser.parse_args()
    seen = SeenIds()
    seconds, slowest = 0.0, 0.0
    for start in range(0, args.ids, args.batch):
        ids = [b"M00001:7:000000000-A1B2C:1:1101:%d:%d/1" % (n, n % 977)
               for n in range(start, min(args.ids, start + args.batch))]
        began = time.perf_counter()
        seen.add(ids)
        spent = time.perf_counter() - began
        seconds, slowest = seconds + spent, max(slowest, spent)
    print(json.dumps({
        "ids": args.ids, "add_seconds": round(seconds, 1), "slowest_batch_seconds": round(slowest, 2),
        "digests_mib": round(seen.nbytes / 2**20, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
