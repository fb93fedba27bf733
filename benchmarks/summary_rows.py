"""What the per-input counts cost: reads.tsv rows through job.summary.RunStats.

Each worker feeds its part's reads.tsv rows to RunStats (summary.tsv, the short-read
warning, the report's histograms); the merge adds the parts' counts. This prints rows/s
and the peak memory added while feeding it N rows: the cost per read, and that memory
does not grow with the reads.

    PYTHONPATH=. python3 benchmarks/summary_rows.py [ROWS]
"""
from __future__ import annotations

import sys
import time
import tracemalloc

import numpy as np

from core.outputs import ReadSummary, reads_line
from job.summary import RunStats


def main(rows: int) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 3000, 10_000)
    scores = rng.random(10_000).astype(np.float32)
    lines = [
        reads_line(ReadSummary(f"read{i}", int(lengths[i]), 2, 6, scores[i], "virus" if scores[i] >= 0.5 else "others", ""),
                   1, f"s3://bucket/sample{i % 4}.fastq.gz")
        for i in range(10_000)
    ]
    for size in (rows // 10, rows):
        stats = RunStats([f"s3://bucket/sample{i}.fastq.gz" for i in range(4)], 500)
        started = time.perf_counter()
        for i in range(size):
            stats.add_row(lines[i % 10_000])
        seconds = time.perf_counter() - started
        stats = RunStats([f"s3://bucket/sample{i}.fastq.gz" for i in range(4)], 500)
        tracemalloc.start()  # a second pass: tracing slows the rows down
        for i in range(size):
            stats.add_row(lines[i % 10_000])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{size:>10,} rows: {size / seconds:,.0f} rows/s, peak memory added {peak / 2**10:.0f} KiB")

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
