"""Reused embeddings on a device (issue 14): what the README says about the last digits, measured.

Mid-size random models (DNABERT-S width, a 2-layer 640-wide ESM-2) over synthetic reads of
which `--repeat-fraction` copy earlier ones, scored in groups of `--group-reads`:

- with reuse against `--no-reuse`: the largest feature and score differences, and the share
  of frames that are bit-equal (all of them on the CPU);
- equal frames of a group: how many got a different score (0 by construction);
- two runs with reuse: byte-identical or not;
- a shard resumed after 4 groups (the committed reads passed as `earlier`, as the worker
  does): how many frames differ from the uninterrupted run, and how many of those have no
  sequence that occurred before the resume point (0 is the README's claim).

    python3 benchmarks/reuse_check.py --device cuda
    python3 benchmarks/reuse_check.py --device cpu --reads 600 --group-reads 64
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.classifier import write_demo_classifier
from core.dnabert import write_demo_model
from core.esm2 import write_demo_checkpoint
from core.frames import chunk_record, open_frames
from core.pipeline import load_predictor

from bench import synthetic_reads  # benchmarks/, beside this script
from full_size_run import with_repeats


def frames_of(record) -> list:  # noqa: ANN001
    return [f for kept in open_frames(chunk_record(record.id, record.sequence, 500)) for f in kept]


def flat(results: list) -> tuple[np.ndarray, np.ndarray]:
    features = np.concatenate([r.features for r in results])
    scores = np.array([[s.score_others, s.score_virus] for r in results for s in r.frames], np.float32)
    return features, scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--group-reads", type=int, default=256)
    parser.add_argument("--repeat-fraction", type=float, default=0.3)
    parser.add_argument("--compile", action="store_true", help="run the GPU engine compiled (slower to start)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # as a CPU worker runs
    models = Path(tempfile.mkdtemp(prefix="reuse-check-"))
    write_demo_checkpoint(models / "esm.pt", num_layers=2, embed_dim=640, heads=20)
    write_demo_model(models / "dna", layers=2, hidden=768, heads=12, intermediate=3072, vocab=4096, safetensors=True)
    write_demo_classifier(models / "classifier_500.pth", models / "classifier_500.safetensors",
                          input_dim=768 + 640, hidden_dim=32, chunk_length=500)
    reads = with_repeats(synthetic_reads(args.reads), args.repeat_fraction)

    def run(reuse: bool, records: list, earlier: list = ()) -> tuple[list, float]:  # noqa: ANN001
        predictor = load_predictor(str(models / "esm.pt"), str(models / "dna"), str(models / "classifier_500.pth"),
                                   device=args.device, group_reads=args.group_reads, reuse=reuse, compile=args.compile)
        predictor.warm_up()
        started = time.perf_counter()
        results = list(predictor.predict(records, with_features=True, earlier=iter(earlier)))
        return results, time.perf_counter() - started

    every, every_s = run(False, reads)
    reused, reused_s = run(True, reads)
    again, _ = run(True, reads)
    fa, sa = flat(every)
    fb, sb = flat(reused)
    fc, sc = flat(again)
    print(f"{args.device}: {len(reads)} reads, {len(sa)} frames; without reuse {every_s:.2f} s, with reuse {reused_s:.2f} s")
    print(f"reuse vs no reuse: max |feature diff| {np.abs(fa - fb).max():.3g}, max |score diff| {np.abs(sa - sb).max():.3g}, "
          f"frames bit-equal {np.mean((fa == fb).all(1) & (sa == sb).all(1)):.4f}")
    print(f"two runs with reuse byte-identical: {np.array_equal(fb, fc) and np.array_equal(sb, sc)}")
    repeated = different = 0
    for start in range(0, len(reads), args.group_reads):
        first: dict[tuple[str, str], tuple] = {}
        for record, result in zip(reads[start:start + args.group_reads], reused[start:start + args.group_reads]):
            for frame, score in zip(frames_of(record), result.frames):
                key, value = (frame.nucleotide, frame.protein), (score.score_others, score.score_virus)
                if key in first:
                    repeated += 1
                    different += first[key] != value
                else:
                    first[key] = value
    print(f"equal frames within a group: {repeated} repeats, {different} with another score")
    skip = 4 * args.group_reads
    resumed, _ = run(True, reads[skip:], reads[:skip])
    before = [frames_of(r) for r in reads[:skip]]
    nucleotides = {f.nucleotide for frames in before for f in frames}
    proteins = {f.protein for frames in before for f in frames}
    touched = differ = differ_untouched = 0
    for record, x, y in zip(reads[skip:], reused[skip:], resumed):
        for i, frame in enumerate(frames_of(record)):
            same = np.array_equal(x.features[i], y.features[i]) and x.frames[i] == y.frames[i]
            met_before = frame.nucleotide in nucleotides or frame.protein in proteins
            touched += met_before
            differ += not same
            differ_untouched += not same and not met_before
    print(f"resumed after read {skip}: {touched} frames have a sequence met before the resume point; "
          f"{differ} frames differ from the uninterrupted run, {differ_untouched} of them without such a sequence")
    return 1 if different or differ_untouched else 0


if __name__ == "__main__":
    sys.exit(main())
