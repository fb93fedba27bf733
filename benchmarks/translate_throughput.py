"""Reads per second through parse + chunk + six-frame translation + frame selection, one core.

    python benchmarks/translate_throughput.py [--reads 200000] [--length 500]

Times the same code `virnucpro run` uses (core.reads, core.frames) over an in-memory FASTA
of random reads, in groups as the predictor feeds it.
"""
from __future__ import annotations

import argparse
import io
import random
import time
from itertools import islice

from core.reads import read_records as read_fasta
from core.frames import chunk_record, open_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--chunk-length", type=int, default=500)
    parser.add_argument("--group", type=int, default=512)
    parser.add_argument("--alphabet", default="ACGT", help="ACG: no stop codon anywhere, all six frames kept")
    args = parser.parse_args()
    rng = random.Random(0)
    fasta = b"".join(
        b">read_%d\n%s\n" % (i, "".join(rng.choices(args.alphabet, k=args.length)).encode())
        for i in range(args.reads)
    )
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        frames = 0
        records = read_fasta(io.BufferedReader(io.BytesIO(fasta)), "bench.fa")
        while group := list(islice(records, args.group)):
            chunks = [c for r in group for c in chunk_record(r.id, r.sequence, args.chunk_length)]
            frames += sum(len(kept) for kept in open_frames(chunks))
        best = max(best, args.reads / (time.perf_counter() - started))
    print(f"reads={args.reads} length={args.length} alphabet={args.alphabet} kept_frames={frames} best_of_3={best:,.0f} reads/s")


if __name__ == "__main__":
    main()
