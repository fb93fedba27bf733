"""Reads/s and MB/s of the input path, one core, from bytes in memory (no disk, no S3).

Variants: the worker-side reader (`core.reads.read_records`) on plain and gzip FASTQ and
FASTA; dnaio (cutadapt's C parser) on the same bytes, raw and turned into our `Record`s, to
show what a C parser would buy; gzip inflate alone with Python's zlib, isal and zlib-ng;
and the planner's `core.scan.RecordScanner` on plain bytes. Reads are generated:
Illumina-style 150 bp FASTQ with Casava descriptions, FASTA of the same reads.

    python3 -m pip install dnaio zlib-ng   # the comparison rows only; not dependencies
    python3 benchmarks/read_throughput.py [--reads 400000] [--repeat 3]

Each figure is the best of `--repeat` runs, in reads per CPU-second of this process (wall
time alongside). Pin it to one core with `taskset -c 0`.
"""
from __future__ import annotations

import argparse
import gzip
import io
import random
import time
from collections.abc import Callable

from core.reads import Record, read_id, read_records
from core.scan import RecordScanner

BLOCK = 1 << 20


def fastq(reads: int, length: int) -> bytes:
    rng = random.Random(1)
    pool = ["".join(rng.choices("ACGT", k=length)) for _ in range(1000)]
    quality = "F" * length
    return "".join(
        f"@A00123:8:H3NNJDSXX:4:1101:{i}:{i % 9000} {1 + i % 2}:N:0:ACGTACGT+TTGGCCAA\n{pool[i % 1000]}\n+\n{quality}\n"
        for i in range(reads)
    ).encode()


def fasta(reads: int, length: int) -> bytes:
    rng = random.Random(1)
    pool = ["".join(rng.choices("ACGT", k=length)) for _ in range(1000)]
    return "".join(f">read_{i}\n{pool[i % 1000]}\n" for i in range(reads)).encode()


def best(repeat: int, run: Callable[[], int]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, the count `run` returns), best of `repeat`.

    CPU time is what the figures use: on a shared machine wall time also counts the time
    other processes held the core."""
    wall = cpu = float("inf")
    count = 0
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        count = run()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, count


def report(label: str, wall: float, cpu: float, reads: int, size: int) -> None:
    print(f"{label:<40} {reads / cpu:>11,.0f} reads/s {size / cpu / 1e6:>6.0f} MB/s   "
          f"(wall: {reads / wall:>11,.0f} reads/s)")


def reader(data: bytes) -> Callable[[], int]:
    return lambda: sum(1 for _ in read_records(io.BytesIO(data), "bench"))


def scanner(blocks: list[bytes]) -> Callable[[], int]:
    def run() -> int:
        scan = RecordScanner("bench")
        return sum(len(scan.feed(block)) for block in blocks) + len(scan.close())

    return run


def dnaio_raw(data: bytes) -> Callable[[], int]:
    import dnaio

    return lambda: sum(1 for _ in dnaio.open(io.BytesIO(data)))


def dnaio_records(data: bytes) -> Callable[[], int]:
    """dnaio parsing, then the work our reader adds per record: mate rule, status, Record."""
    import dnaio

    def run() -> int:
        count = 0
        for count, raw in enumerate(dnaio.open(io.BytesIO(data)), 1):
            sequence = raw.sequence
            Record(read_id(raw.name.encode()).decode(), sequence, 4 * count - 3, None if sequence.isalpha() else "invalid_characters")
        return count

    return run


def inflate(data: bytes, opener: Callable) -> Callable[[], int]:  # noqa: ANN001
    def run() -> int:
        with opener(io.BytesIO(data)) as stream:
            while stream.read(BLOCK):
                pass
        return 0

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=400_000)
    parser.add_argument("--length", type=int, default=150, help="bases per read (default 150)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from isal import igzip
    from zlib_ng import gzip_ng

    fq, fa = fastq(args.reads, args.length), fasta(args.reads, args.length)
    fq_gz, fa_gz = gzip.compress(fq, 6), gzip.compress(fa, 6)
    n = args.reads
    print(f"{n:,} reads of {args.length} bp: FASTQ {len(fq) / 1e6:.0f} MB ({len(fq_gz) / 1e6:.0f} MB gzip), "
          f"FASTA {len(fa) / 1e6:.0f} MB ({len(fa_gz) / 1e6:.0f} MB gzip); MB/s of uncompressed bytes")
    for label, data, run in [
        ("scanner, FASTQ", fq, scanner([fq[i : i + BLOCK] for i in range(0, len(fq), BLOCK)])),
        ("scanner, FASTA", fa, scanner([fa[i : i + BLOCK] for i in range(0, len(fa), BLOCK)])),
        ("reader, FASTQ plain", fq, reader(fq)),
        ("reader, FASTQ gzip", fq, reader(fq_gz)),
        ("reader, FASTA plain", fa, reader(fa)),
        ("reader, FASTA gzip", fa, reader(fa_gz)),
        ("dnaio, FASTQ plain (parse only)", fq, dnaio_raw(fq)),
        ("dnaio, FASTQ plain -> Record", fq, dnaio_records(fq)),
    ]:
        wall, cpu, count = best(args.repeat, run)
        assert count == n, (label, count)
        report(label, wall, cpu, n, len(data))
    for label, opener in [
        ("inflate only, Python gzip (zlib)", lambda s: gzip.GzipFile(fileobj=s)),
        ("inflate only, isal igzip", lambda s: igzip.IGzipFile(fileobj=s)),
        ("inflate only, zlib-ng", lambda s: gzip_ng.GzipFile(fileobj=s)),
    ]:
        wall, cpu, _ = best(args.repeat, inflate(fq_gz, opener))
        report(label + " (FASTQ)", wall, cpu, n, len(fq))


if __name__ == "__main__":
    main()
