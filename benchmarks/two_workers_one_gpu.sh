#!/usr/bin/env bash
# Issue 6, single-GPU part: two workers pinned to one GPU must not corrupt each other, and the
# worker count must follow the visible GPUs. Runs the real job (demo models, local paths) on
# synthetic 500-bp reads (3,000, or READS) three ways and compares the outputs byte for byte:
#   A: default workers (one per visible GPU)   B: --workers 2 on the same GPU
#   C: CUDA_VISIBLE_DEVICES="" --device cpu    (worker count falls back to 1, on the CPU)
#   D: A again                                 (run-to-run repeatability on the GPU, for scale)
set -euo pipefail
work=${1:-/tmp/two-workers}
rm -rf "$work" && mkdir -p "$work"
vnp() { python3 -m job.cli "$@"; }
vnp make-demo-models "$work/models" 2>/dev/null
python3 - "$work/reads.fa" "${READS:-3000}" <<'PY'
import random, sys
rng = random.Random(6)
with open(sys.argv[1], "w") as out:
    for i in range(int(sys.argv[2])):
        alphabet = "ACG" if i % 3 else "ACGT"  # two thirds stop-free: every frame open
        out.write(f">read_{i}\n{''.join(rng.choice(alphabet) for _ in range(500))}\n")
PY
common=(--input "$work/reads.fa" --esm-model "$work/models/esm2_demo.pt"
        --dnabert-model "$work/models/dnabert_demo" --classifier "$work/models/classifier_500.pth"
        --shard-reads 150 --write-features)
run() { local name=$1; shift; local t0=$SECONDS; "$@" --output "$work/$name" >"$work/$name.out" 2>"$work/$name.log";
        echo "$name: exit 0 in $((SECONDS - t0)) s; $(grep -o '"workers": [0-9]*, "gpus": [0-9]*' "$work/$name.log")"; }
run A vnp run "${common[@]}" --device cuda
run B vnp run "${common[@]}" --device cuda --workers 2
CUDA_VISIBLE_DEVICES="" run C vnp run "${common[@]}" --device cpu
run D vnp run "${common[@]}" --device cuda
for other in B D; do
  for f in prediction_results.txt prediction_results_highestscore.csv reads.tsv; do
    cmp -s "$work/A/$f" "$work/$other/$f" && echo "A == $other: $f identical" || echo "A != $other: $f differs"
  done
done
python3 - "$work" <<'PY'
import json, sys, h5py, numpy as np
w = sys.argv[1]
a, b, c, d = (h5py.File(f"{w}/{n}/features.h5")["features"][:] for n in "ABCD")
print(f"features A vs B (two workers): max abs diff {np.abs(a - b).max():.3g} over {a.shape}")
print(f"features A vs D (same command again): max abs diff {np.abs(a - d).max():.3g}")
def scores(n):
    rows = [l.split("\t") for l in open(f"{w}/{n}/prediction_results.txt").read().splitlines()[1:]]
    return [r[0] for r in rows], np.array([[float(r[2]), float(r[3])] for r in rows])
(ids_a, sa), (ids_b, sb), (ids_d, sd) = scores("A"), scores("B"), scores("D")
assert ids_a == ids_b == ids_d, "frame ids or their order differ"
print(f"scores: same frame ids in the same order; max abs diff A-B {np.abs(sa - sb).max():.3g}, A-D {np.abs(sa - sd).max():.3g}")
print(f"features A (GPU fp16) vs C (CPU fp32): max abs diff {np.abs(a - c).max():.3g}")
for n in "AB":
    s = json.load(open(f"{w}/{n}/_SUCCESS"))
    print(n, "reads", s["reads"], "frames", s["frames"], "shards", s["shards"])
workers = {}
for line in open(f"{w}/B.log"):
    e = json.loads(line)
    if e.get("event") == "engine_ready":
        print("B: engine ready at", e["timestamp"], "after a warm-up of", e["warm_up_seconds"], "s")
    if e.get("event") == "shard_done":
        workers.setdefault(e["worker"], 0); workers[e["worker"]] += 1
print("B: shards done per worker:", workers)
PY
