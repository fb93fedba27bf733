"""Loading the two encoders (issue 14): one after the other vs a thread each, and each from
its source vs its converted-weights file (job.model_cache), best of `--rounds`.

    python3 benchmarks/encoder_load.py --work /tmp/encoder-load            # CPU, mid-size models
    python3 benchmarks/encoder_load.py --work /tmp/encoder-load --device cuda --full-size

Writes random models in the published formats under --work once (DNABERT-S at full size;
ESM-2 12 layers x 1280, or 36 x 2560 with --full-size), then times the loads; the page cache
is warm (a fresh machine's first read is the disk's: see full_size_run.py --cold-start).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from core.dnabert import load_dnabert, write_demo_model
from core.esm2 import load_esm2, write_demo_checkpoint
from job.model_cache import WeightsCache
from job.models import sha256_path


def best(rounds: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/encoder-load")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true", help="ESM-2 3B (11 GB) instead of 12 x 1280")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work, device = Path(args.work), torch.device(args.device)
    esm, dna = work / "esm.pt", work / "dnabert"
    if not esm.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_demo_model(dna, layers=12, hidden=768, heads=12, intermediate=3072, vocab=4096, safetensors=True)
        layers, dim, heads = (36, 2560, 40) if args.full_size else (12, 1280, 20)
        write_demo_checkpoint(esm, num_layers=layers, embed_dim=dim, heads=heads)
    shutil.rmtree(work / "converted", ignore_errors=True)
    caches = {"esm": WeightsCache(work / "converted", sha256_path(esm)),
              "dnabert": WeightsCache(work / "converted", sha256_path(dna))}
    loaders = {"esm": lambda cache=None: load_esm2(str(esm), device, cache=cache),
               "dnabert": lambda cache=None: load_dnabert(str(dna), device, cache=cache)}
    for name, load in loaders.items():
        started = time.perf_counter()
        assert load(caches[name]).loaded_from == "source (cached now)"
        written = time.perf_counter() - started
        source = best(args.rounds, load)
        cached = best(args.rounds, lambda: load(caches[name]))
        print(f"{name} on {device}: from source {source:.2f} s, from converted file {cached:.2f} s "
              f"(source + file written: {written:.2f} s)", flush=True)

    def both(cache: bool) -> None:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(load, caches[name] if cache else None) for name, load in loaders.items()]
            for future in futures:
                future.result()

    for cache in (False, True):
        one_by_one = best(args.rounds, lambda: [load(caches[name] if cache else None) for name, load in loaders.items()])
        threads = best(args.rounds, lambda: both(cache))
        print(f"both from {'converted files' if cache else 'sources'}: one after the other {one_by_one:.2f} s, "
              f"a thread each {threads:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
