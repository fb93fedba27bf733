"""The whole job at full size on one GPU: `virnucpro run` against ESM-2 alone (issue 3).

Writes ESM-2 3B, DNABERT-S and a classifier with random weights in the published file
formats, synthetic 500-bp reads with one or two open frames each (the bench's), runs the
real job on them (`python -m job.cli run --device cuda`, local paths, a subprocess), then
embeds the same frames' proteins with ESM-2 alone, and prints frames/s of both.

    python3 benchmarks/full_size_run.py --work /tmp/full-size --reads 12000

The job's frames/s is taken over the span from its shard's claim to its completion
(reading, chunking, both encoders, classifier, parts committed), after model loading and
compilation, which the log reports separately.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from core.bench import synthetic_reads
from core.classifier import write_demo_classifier
from core.dnabert import write_demo_model
from core.esm2 import load_esm2, write_demo_checkpoint
from core.frames import chunk_record, open_frames


def write_models(models: Path) -> dict[str, str]:
    models.mkdir(parents=True, exist_ok=True)
    paths = {"esm": models / "esm2_t36_3B_random.pt", "dnabert": models / "dnabert_s_random",
             "classifier": models / "classifier_500.pth"}
    started = time.perf_counter()
    write_demo_checkpoint(paths["esm"], num_layers=36, embed_dim=2560, heads=40)
    write_demo_model(paths["dnabert"], layers=12, hidden=768, heads=12, intermediate=3072, vocab=4096,
                     safetensors=True)
    write_demo_classifier(paths["classifier"], models / "classifier_500.safetensors", input_dim=768 + 2560)
    print(f"full-size random models written in {time.perf_counter() - started:.0f} s", flush=True)
    return {name: str(path) for name, path in paths.items()}


def log_events(path: Path) -> dict[str, list[dict]]:
    events: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        events.setdefault(event.get("event", ""), []).append(event)
    return events


def stamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/full-size")
    parser.add_argument("--reads", type=int, default=12000)
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    models = write_models(work / "models")
    reads = synthetic_reads(args.reads)
    fasta = work / "reads.fa"
    fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in reads))

    output, log = work / "out", work / "job.log"
    command = [sys.executable, "-m", "job.cli", "run", "--input", str(fasta), "--output", str(output),
               "--esm-model", models["esm"], "--dnabert-model", models["dnabert"],
               "--classifier", models["classifier"], "--device", "cuda"]
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w") as stderr:
        code = subprocess.run(command, stderr=stderr, stdout=subprocess.DEVNULL).returncode
    job_wall = time.perf_counter() - started
    if code != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"the job exited {code}")
    events = log_events(log)
    summary = json.loads((output / "_SUCCESS").read_text())
    ready = events["engine_ready"][0]
    claimed, done = stamp(events["shard_claimed"][0]), stamp(events["shard_done"][-1])
    frames = summary["frames"]
    job_rate = frames / (done - claimed)
    print(f"job: exit 0, {summary['reads']} reads, {frames} frames, wall {job_wall:.1f} s; engine "
          f"{ready['esm']} / {ready['dnabert']}, warm-up {ready['warm_up_seconds']} s; shard claimed -> done "
          f"{done - claimed:.2f} s = {job_rate:,.0f} frames/s (parts' own seconds: {summary['gpu_seconds']} s)")

    chunks = [c for r in reads for c in chunk_record(r.id, r.sequence, 500)]
    proteins = [f.protein for kept in open_frames(chunks) for f in kept]
    device = torch.device("cuda")
    esm = load_esm2(models["esm"], device)
    esm.warm_up()
    esm.embed(proteins[:2000])
    torch.cuda.synchronize()
    runs = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        esm.embed(proteins)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - started)
    esm_rate = len(proteins) / min(runs)
    print(f"ESM-2 alone on the same {len(proteins)} proteins: {min(runs):.2f} s (runs {[round(r, 2) for r in runs]}) "
          f"= {esm_rate:,.0f} frames/s")
    print(f"job / ESM-2 alone: {100 * job_rate / esm_rate:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
