"""The whole job at full size: `virnucpro run` against ESM-2 alone (issue 3), its scaling
over the GPUs of one host (issue 6), and reused embeddings of repeated reads (issue 14).

Writes ESM-2 3B, DNABERT-S and a classifier with random weights in the published file
formats and synthetic 500-bp reads with one or two open frames each (the bench's), then for
each GPU count n runs the real job (`python -m job.cli run --device cuda`, local paths, a
subprocess) with CUDA_VISIBLE_DEVICES set to the first n GPUs (of those CUDA_VISIBLE_DEVICES
names, when set), so it starts one worker per GPU over `--reads-per-gpu` x n reads; finally
it embeds one run's proteins with ESM-2 alone.

    python3 benchmarks/full_size_run.py --work /tmp/full-size --reads-per-gpu 12000
    python3 benchmarks/full_size_run.py --gpus 1 2 4 8      # on a host with 8 GPUs
    CUDA_VISIBLE_DEVICES=1 python3 benchmarks/full_size_run.py   # the second GPU alone
    python3 benchmarks/full_size_run.py --cores 16 8 16     # one worker on fewer host cores
    python3 benchmarks/full_size_run.py --repeat-fraction 0.3 --compare-reuse --shards-per-gpu 1
    python3 benchmarks/full_size_run.py --device cpu --reads-per-gpu 2000 --repeat-fraction 0.3 --compare-reuse
    python3 benchmarks/full_size_run.py --cold-start        # issue 14: start to first scored batch
    python3 benchmarks/full_size_run.py --cold-start --smoke  # the same with demo models on the CPU

A run's frames/s is taken from the first shard claimed to the last shard done (reading,
chunking, both encoders, classifier, parts committed), after model loading and
compilation, which each worker's "time to first batch" shows. Scaling efficiency is
frames/s over n times the one-GPU frames/s.

--repeat-fraction F makes that share of the reads copies of earlier reads (their letters
under new ids) at random positions; --compare-reuse then runs each job twice, with
`--no-reuse` first, and prints both frames/s, counted over all frames, and their ratio.
Embeddings are reused within a shard (core/pipeline.py): the run prints how many of the
repeats have their first copy in the same shard, the most the reuse can find.
--device cpu runs the demo-size models on the CPU (one worker): a smoke test of this
script, whose figures say nothing about a GPU.

--cold-start --compile-bytecode first writes the bytecode (.pyc) of the installed packages,
as `pip install` does when the image is built (Dockerfile): a Python environment without
it (PYTHONDONTWRITEBYTECODE set, or installed with --no-compile) compiles torch, its
compiler and botocore from source at every start, seconds the image never spends. The
figures record whether torch had bytecode.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from datetime import datetime
from pathlib import Path

import torch

from core.classifier import write_demo_classifier
from core.dnabert import write_demo_model
from core.esm2 import load_esm2, write_demo_checkpoint
from core.frames import chunk_record, open_frames
from core.reads import Record

from bench import synthetic_reads  # benchmarks/bench.py, beside this script


def write_models(models: Path, full_size: bool = True) -> dict[str, str]:
    """ESM-2 3B, DNABERT-S and a classifier with random weights; or, with full_size=False,
    the demo sizes of `virnucpro make-demo-models`."""
    models.mkdir(parents=True, exist_ok=True)
    paths = {"esm": models / "esm2_t36_3B_random.pt", "dnabert": models / "dnabert_s_random",
             "classifier": models / "classifier_500.pth"}
    started = time.perf_counter()
    if full_size:
        write_demo_checkpoint(paths["esm"], num_layers=36, embed_dim=2560, heads=40)
        write_demo_model(paths["dnabert"], layers=12, hidden=768, heads=12, intermediate=3072, vocab=4096,
                         safetensors=True)
        write_demo_classifier(paths["classifier"], models / "classifier_500.safetensors", input_dim=768 + 2560)
    else:
        write_demo_checkpoint(paths["esm"], num_layers=2, embed_dim=64, heads=4)
        write_demo_model(paths["dnabert"], layers=2, hidden=64, heads=4)
        write_demo_classifier(paths["classifier"], models / "classifier_500.safetensors", input_dim=128,
                              hidden_dim=32, chunk_length=500)
    print(f"{'full-size' if full_size else 'demo-size'} random models written in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return {name: str(path) for name, path in paths.items()}


def with_repeats(reads: list[Record], fraction: float, seed: int = 7) -> list[Record]:
    """The reads with `fraction` of them (never the first) replaced by copies of an earlier
    read's letters, each under its own id: the copies sit at random positions, each copying
    a read chosen at random among those before it."""
    rng = random.Random(seed)
    copies = set(rng.sample(range(1, len(reads)), round(fraction * len(reads)))) if len(reads) > 1 else set()
    sequences: list[str] = []
    for i, read in enumerate(reads):
        sequences.append(rng.choice(sequences) if i in copies else read.sequence)
    return [Record(f"read_{i}", sequence, i + 1) for i, sequence in enumerate(sequences)]


def repeats_in_shard(reads: list[Record], shard_reads: int) -> tuple[int, int]:
    """(reads repeating an earlier read, those whose first copy is in the same shard)."""
    first: dict[str, int] = {}
    repeats = same_shard = 0
    for i, read in enumerate(reads):
        origin = first.setdefault(read.sequence, i)
        if origin != i:
            repeats += 1
            same_shard += origin // shard_reads == i // shard_reads
    return repeats, same_shard


def log_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def stamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def job_command(run_dir: Path, models: dict[str, str], reads: list, device: str) -> tuple[Path, Path, list[str]]:
    """Write `reads` under `run_dir` and return (output, log, the `virnucpro run` argv) on the
    given models. The spot poller is pointed at a closed loopback port: the benchmark runs
    outside EC2 and must ask no metadata service."""
    run_dir.mkdir(parents=True)
    fasta, output, log = run_dir / "reads.fa", run_dir / "out", run_dir / "job.log"
    fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in reads))
    command = [sys.executable, "-m", "job.cli", "run", "--input", str(fasta), "--output", str(output),
               "--esm-model", models["esm"], "--dnabert-model", models["dnabert"],
               "--classifier", models["classifier"], "--device", device, "--imds-url", "http://127.0.0.1:9"]
    return output, log, command


def first_gpus(count: int) -> str:
    """CUDA_VISIBLE_DEVICES for a job on the first `count` GPUs: of those CUDA_VISIBLE_DEVICES
    names when it is set, else of all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    return ",".join(visible.split(",")[:count])


def run_job(work: Path, models: dict[str, str], gpus: int, reads: list, shard_reads: int,
            device: str = "cuda", reuse: bool = True, cores: int | None = None) -> dict:
    """One job over `reads` on the first `gpus` GPUs (or one CPU worker); its figures from
    the log and _SUCCESS. `cores`: the job (its workers inherit it) may use only the host's
    first `cores` CPU cores."""
    name = f"gpus{gpus}{'' if reuse else '-no-reuse'}{'' if cores is None else f'-cores{cores}'}"
    shutil.rmtree(work / name, ignore_errors=True)  # a count given twice runs again
    output, log, command = job_command(work / name, models, reads, device)
    command += ["--shard-reads", str(shard_reads)]
    if not reuse:
        command.append("--no-reuse")
    env = dict(os.environ)
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = first_gpus(gpus)
        print(f"$ CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " + " ".join(command), flush=True)
    else:
        command += ["--workers", "1"]
        print("$ " + " ".join(command), flush=True)
    every_core = os.sched_getaffinity(0)
    allowed = sorted(every_core)[:cores]  # all of them when cores is None
    os.sched_setaffinity(0, allowed)
    started = time.perf_counter()
    try:
        with open(log, "w") as stderr:
            code = subprocess.run(command, stderr=stderr, stdout=subprocess.DEVNULL, env=env).returncode
    finally:
        os.sched_setaffinity(0, every_core)
    wall = time.perf_counter() - started
    if code != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"the job on {gpus} GPU(s) exited {code}")
    events = log_events(log)
    summary = json.loads((output / "_SUCCESS").read_text())
    launched = stamp(next(e for e in events if e.get("event") == "workers_started"))
    workers: dict[str, dict] = {}
    for event in events:
        worker = event.get("worker")
        if worker is None:
            continue
        seen = workers.setdefault(worker, {"shards": 0})
        if event["event"] == "shard_claimed":
            seen.setdefault("first_batch_s", round(stamp(event) - launched, 1))
        elif event["event"] == "shard_done":
            seen["shards"] += 1
            seen["last_done_s"] = round(stamp(event) - launched, 1)
        elif event["event"] == "worker_finished":
            seen["peak_gpu_gib"] = event.get("peak_gpu_gib")
    claims = [stamp(e) for e in events if e.get("event") == "shard_claimed"]
    dones = [stamp(e) for e in events if e.get("event") == "shard_done"]
    seconds = max(dones) - min(claims)
    warm_ups = [e["warm_up_seconds"] for e in events if e.get("event") == "engine_ready"]
    result = {"gpus": gpus, "cores": len(allowed), "reuse": reuse, "workers": len(workers), "reads": summary["reads"], "frames": summary["frames"],
              "shards": summary["shards"], "seconds": round(seconds, 2), "frames_per_s": summary["frames"] / seconds,
              "wall_s": round(wall, 1), "warm_up_s": warm_ups, "per_worker": list(workers.values())}
    # what the timed window holds besides work: workers claiming their first shard, and
    # finishing their last, at different times (0 with one worker)
    firsts = [w["first_batch_s"] for w in workers.values() if "first_batch_s" in w]
    lasts = [w["last_done_s"] for w in workers.values() if "last_done_s" in w]
    result["start_stagger_s"] = round(max(firsts) - min(firsts), 1) if firsts else None
    result["end_stagger_s"] = round(max(lasts) - min(lasts), 1) if lasts else None
    print(f"  {gpus} GPU(s){'' if reuse else ' without reuse'}, {result['cores']} CPU cores: {result['workers']} workers, {result['reads']} reads, {result['frames']} frames in "
          f"{seconds:.2f} s = {result['frames_per_s']:,.0f} frames/s; wall {wall:.1f} s; warm-ups {warm_ups} s; "
          f"first shards claimed {result['start_stagger_s']} s apart, last ones done {result['end_stagger_s']} s apart; "
          f"per worker {result['per_worker']}", flush=True)
    return result


COLD_START_STEPS = (  # (label, event that ends it), in the order a worker meets them
    ("parent: start to the workers' start (model checksums, GPU count)", "workers_started"),
    ("worker: process start", None),  # the rest of the worker's time to models_loaded
    ("worker: import torch", "import_seconds"),
    ("worker: load both encoders (and compile DNABERT-S meanwhile)", "load_seconds"),
    ("worker: compiler artifacts saved", None),  # engine_ready - models_loaded - the warm-up (loaded before the models)
    ("worker: warm-up (ESM-2; compile)", "warm_up_seconds"),
    ("worker: waiting for the parent's plan", "worker_started"),  # the parent checks and plans meanwhile
    ("worker: first group scored", "first_batch_scored"),
)


def cold_start_job(work: Path, models: dict[str, str], label: str, model_cache: Path, reads: list,
                   device: str) -> dict:
    """`virnucpro run` on one worker, timed from the command's start to the first scored
    group (`first_batch_scored`), with a breakdown from the log. The compiler's own cache
    directories are new and empty for every run (a fresh machine's /tmp); `model_cache` is
    what the run may find from an earlier one (converted weights, compiler artifacts)."""
    run_dir = work / f"cold-{label}"
    output, log, command = job_command(run_dir, models, reads, device)
    command += ["--workers", "1", "--model-cache", str(model_cache), "--log-format", "json"]
    if device == "cpu":
        command.append("--compile")  # compile the CPU engine too, so that its cache plays a part
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor"), "TRITON_CACHE_DIR": str(run_dir / "triton")}
    if device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = first_gpus(1)
    print(f"$ TORCHINDUCTOR_CACHE_DIR={env['TORCHINDUCTOR_CACHE_DIR']} TRITON_CACHE_DIR={env['TRITON_CACHE_DIR']} "
          + " ".join(command), flush=True)
    started = time.time()
    with open(log, "w") as stderr:
        code = subprocess.run(command, stderr=stderr, stdout=subprocess.DEVNULL, env=env).returncode
    if code != 0:
        print(log.read_text()[-4000:])
        raise SystemExit(f"the cold-start run ({label}) exited {code}")
    events = {}
    for event in log_events(log):
        events.setdefault(event.get("event"), event)  # the first of each
    first = stamp(events["first_batch_scored"]) - started
    loaded, ready = events["models_loaded"], events["engine_ready"]
    steps = {
        COLD_START_STEPS[0][0]: stamp(events["workers_started"]) - started,
        COLD_START_STEPS[1][0]: stamp(loaded) - stamp(events["workers_started"])
        - loaded["import_seconds"] - loaded["load_seconds"],
        COLD_START_STEPS[2][0]: loaded["import_seconds"],
        COLD_START_STEPS[3][0]: loaded["load_seconds"],
        COLD_START_STEPS[4][0]: stamp(ready) - stamp(loaded) - ready["warm_up_seconds"],
        COLD_START_STEPS[5][0]: ready["warm_up_seconds"],
        COLD_START_STEPS[6][0]: stamp(events["worker_started"]) - stamp(ready),
        COLD_START_STEPS[7][0]: stamp(events["first_batch_scored"]) - stamp(events["worker_started"]),
    }
    result = {"label": label, "first_batch_s": round(first, 1), "steps_s": {k: round(v, 1) for k, v in steps.items()},
              "esm": loaded["esm"], "dnabert": loaded["dnabert"], "compiler_cache": ready.get("compiler_cache"),
              "plan_settled_s": round(stamp(events["run_planned"]) - started, 1)}
    print(f"  {label}: first scored batch {first:.1f} s after the command started (the parent settled the plan at "
          f"{result['plan_settled_s']} s); ESM-2 from {loaded['esm']}, DNABERT-S from {loaded['dnabert']}, "
          f"compiler cache: {ready.get('compiler_cache')}", flush=True)
    return result


def drop_page_cache() -> None:
    """Evict the files just written (the models, the caches) from memory, as on a fresh
    machine; needs root outside a container's read-only /proc/sys. Says whether it worked."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        print("  page cache dropped: the models and caches are read from disk", flush=True)
    except OSError as error:
        print(f"  page cache NOT dropped ({error}): the models and caches are read from memory", flush=True)


def torch_has_bytecode() -> bool:
    """Whether torch's own modules have bytecode for this interpreter (written by pip)."""
    package = Path(torch.__file__).parent
    return any(package.glob(f"__pycache__/*.{sys.implementation.cache_tag}.pyc"))


def compile_bytecode() -> None:
    """Write the bytecode of the installed packages (site-packages and PYTHONPATH), as pip
    does at install time."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *sorted(paths)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"  bytecode written in {time.perf_counter() - started:.0f} s for {sorted(paths)}", flush=True)


def cold_start(work: Path, models: dict[str, str], device: str, reads: int, drop: bool) -> list[dict]:
    """(a) empty caches, then (b) the model cache (a) left behind, compiler dirs empty again."""
    model_cache = work / "model-cache"
    runs = []
    for index, label in enumerate(("empty-caches", "caches-populated")):
        if drop:
            drop_page_cache()
        runs.append(cold_start_job(work, models, label, model_cache, synthetic_reads(reads, seed=index), device))
    print("| step | empty caches (s) | caches populated (s) |")
    print("| --- | ---: | ---: |")
    for step, _ in COLD_START_STEPS:
        print(f"| {step} | {runs[0]['steps_s'][step]} | {runs[1]['steps_s'][step]} |")
    print(f"| **command start -> first scored batch** | **{runs[0]['first_batch_s']}** | **{runs[1]['first_batch_s']}** |")
    return runs


def esm_alone(esm_path: str, proteins: list[str]) -> float:
    """ESM-2 alone on the same proteins, on GPU 0, best of two: frames/s."""
    esm = load_esm2(esm_path, torch.device("cuda"))
    esm.warm_up()
    esm.embed(proteins[:2000])
    runs = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        esm.embed(proteins)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - started)
    print(f"ESM-2 alone on the same {len(proteins)} proteins: {min(runs):.2f} s "
          f"(runs {[round(r, 2) for r in runs]}) = {len(proteins) / min(runs):,.0f} frames/s")
    return len(proteins) / min(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/full-size")
    parser.add_argument("--reads-per-gpu", type=int, default=12000)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="GPU counts to run (default: 1)")
    parser.add_argument("--shards-per-gpu", type=int, default=4)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: demo-size models, one worker (a smoke test of this script)")
    parser.add_argument("--repeat-fraction", type=float, default=0.0,
                        help="share of the reads that copy an earlier read, at random positions (default: 0)")
    parser.add_argument("--compare-reuse", action="store_true",
                        help="run each job without reuse (--no-reuse), then with it; print both and the ratio")
    parser.add_argument("--cores", type=int, nargs="+",
                        help="run each job once per count, on the host's first N CPU cores only: how much of "
                             "the host one worker needs (two workers on one host share it)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--cold-start", action="store_true",
                        help="measure only the time from the command's start to the first scored batch, "
                             "with empty caches and with the caches the first run left (issue 14)")
    parser.add_argument("--smoke", action="store_true", help="with --cold-start: demo models on the CPU")
    parser.add_argument("--drop-page-cache", action="store_true",
                        help="with --cold-start: drop the page cache before each run (root), as on a fresh machine")
    parser.add_argument("--compile-bytecode", action="store_true",
                        help="with --cold-start: write the installed packages' bytecode first, as the image has it")
    args = parser.parse_args()
    if args.cold_start:
        work = Path(args.work)
        shutil.rmtree(work, ignore_errors=True)
        models = write_models(work / "models", full_size=not args.smoke)
        bytecode = {"torch_had_bytecode": torch_has_bytecode()}
        if args.compile_bytecode:
            compile_bytecode()
        bytecode["torch_has_bytecode"] = torch_has_bytecode()
        print(f"  {bytecode}", flush=True)
        runs = cold_start(work, models, "cpu" if args.smoke else "cuda", 24 if args.smoke else 2048, args.drop_page_cache)
        if args.json:
            Path(args.json).write_text(json.dumps({"cold_start": runs, **bytecode}, indent=2))
        return 0
    cuda = args.device == "cuda"
    if cuda and max(args.gpus) > torch.cuda.device_count():
        raise SystemExit(f"asked for {max(args.gpus)} GPUs, {torch.cuda.device_count()} visible")
    if args.cores and args.compare_reuse:
        raise SystemExit("--cores and --compare-reuse: one at a time")
    if not cuda and args.gpus != [1]:
        raise SystemExit("--device cpu runs one worker: leave --gpus at 1")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    models = write_models(work / "models", full_size=cuda)
    runs, compared = [], []
    for gpus in args.gpus:
        reads = with_repeats(synthetic_reads(args.reads_per_gpu * gpus), args.repeat_fraction)
        shard_reads = max(1, len(reads) // (args.shards_per_gpu * gpus))
        repeats, same_shard = repeats_in_shard(reads, shard_reads)
        print(f"{len(reads)} reads, {repeats} repeating an earlier read, {same_shard} of them in the same "
              f"shard of {shard_reads} reads (the repeats reuse can find)", flush=True)
        if args.compare_reuse:
            without = run_job(work, models, gpus, reads, shard_reads, args.device, reuse=False)
            runs.append(without)
        for cores in args.cores or [None]:
            runs.append(run_job(work, models, gpus, reads, shard_reads, args.device, cores=cores))
        if args.compare_reuse:
            runs[-1]["repeats"], runs[-1]["repeats_in_shard"] = repeats, same_shard
            compared.append((without, runs[-1]))

    if compared:
        print("| GPUs | reads | repeating reads (in the same shard) | frames | frames/s without reuse | "
              "frames/s with reuse | ratio |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for without, reused in compared:
            reused["vs_no_reuse"] = reused["frames_per_s"] / without["frames_per_s"]
            print(f"| {reused['gpus']} | {reused['reads']} | {reused['repeats']} ({reused['repeats_in_shard']}) | "
                  f"{reused['frames']} | {without['frames_per_s']:,.1f} | {reused['frames_per_s']:,.1f} | "
                  f"{reused['vs_no_reuse']:.2f}x |")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs}, indent=2))
        return 0
    if not cuda:
        for run in runs:
            print(f"| {run['gpus']} | {run['cores']} | {run['reads']} | {run['frames']} | {run['frames_per_s']:,.1f} |")
        return 0

    reads = synthetic_reads(args.reads_per_gpu)
    chunks = [c for r in reads for c in chunk_record(r.id, r.sequence, 500)]
    esm_rate = esm_alone(models["esm"], [f.protein for kept in open_frames(chunks) for f in kept])
    one = next((r for r in runs if r["gpus"] == 1), None)
    print("| GPUs | CPU cores | workers | frames | frames/s | vs ESM-2 alone on one GPU | scaling efficiency | "
          "time to first batch per worker (s) | peak GPU GiB per worker |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for run in runs:
        run["vs_esm_alone"] = run["frames_per_s"] / esm_rate
        run["efficiency"] = run["frames_per_s"] / (run["gpus"] * one["frames_per_s"]) if one else None
        efficiency = f"{100 * run['efficiency']:.1f}%" if one else "-"
        first = ", ".join(str(w.get("first_batch_s")) for w in run["per_worker"])
        peaks = ", ".join(str(w.get("peak_gpu_gib")) for w in run["per_worker"])
        print(f"| {run['gpus']} | {run['cores']} | {run['workers']} | {run['frames']} | {run['frames_per_s']:,.0f} | "
              f"{100 * run['vs_esm_alone']:.1f}% | {efficiency} | {first} | {peaks} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"esm_alone_frames_per_s": esm_rate, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
