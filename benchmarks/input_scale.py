"""The data path at scale (issue 11): plan pass, first claim, read work per shard, merge.

Not a test: it prints figures, recorded with their command in docs/PERFORMANCE.md.

    python benchmarks/input_scale.py --reads 100000 --only plan,shards,first-claim,merge
    python benchmarks/input_scale.py --reads 10000000 --only plan,merge

Inputs are generated under --work (kept between calls): a paired-end pair of FASTQ.gz files
(Casava 1.8 headers, `--reads` reads in all, half per mate) and one plain FASTA file of
`--reads` reads. Reads are 50 to 300 bp, nine in ten of them a mutated TTAG repeat, which
has a stop codon in all six frames, so that the demo models have little to score and the
data path is what is timed.

Pieces (each in its own process, so that its peak RSS is its own):
- plan: the plan pass alone (Planner.scan to a local store): reads/s, MB/s, peak RSS;
- shards: every shard read back as a worker reads it (job.plan.shard_records): bytes read
  or decompressed over the whole run (plan pass + every shard) per input byte, and the read
  time of the last shard over the first;
- first-claim: `virnucpro run` on the demo models, --workers 2: seconds from the command's
  start to the first `shard_claimed` log line (the run is then stopped);
- gzip: the figures the gzip access choice rests on (job/plan.py): inflate speed of zlib,
  ISA-L and indexed_gzip (which also builds a restart-point index), ISA-L and zlib level-1
  deflate, index bytes per restart point (indexed_gzip is optional, not a dependency);
- merge: the merge alone over generated parts of a finished run (local output, and a moto
  S3 server on 127.0.0.1 with --s3): reads/s, peak RSS, and the peak size of its temporary
  directory beside the highest-score file it sorts there. The report's matplotlib is
  imported before the merge is timed, as the job's supervisor imports it while its workers
  run (job/batch.py); its import time is printed apart.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

LENGTHS = (50, 75, 100, 150, 150, 151, 200, 250, 300)


def _sequences(rng: random.Random, count: int = 4096) -> list[str]:
    pool = []
    for n in range(count):
        length = LENGTHS[n % len(LENGTHS)]
        if n % 10 == 0:
            sequence = "".join(rng.choice("ACGT") for _ in range(length))
        else:
            repeat = list(("TTAG" * (length // 4 + 1))[:length])
            for _ in range(length // 25):
                repeat[rng.randrange(length)] = rng.choice("ACGT")
            sequence = "".join(repeat)
        pool.append(sequence)
    return pool


def generate(work: Path, reads: int) -> dict[str, list[Path]]:
    """The benchmark's inputs for `reads` reads (made once, then reused)."""
    from isal import igzip

    work.mkdir(parents=True, exist_ok=True)
    fasta = work / f"reads-{reads}.fa"
    mates = [work / f"reads-{reads}_R{m}.fastq.gz" for m in (1, 2)]
    rng = random.Random(reads)
    pool = _sequences(rng)
    if not fasta.exists():
        with open(str(fasta) + ".tmp", "w") as out:
            for start in range(0, reads, 100_000):
                out.write("".join(
                    f">read{n} sample {n}\n{pool[(n * 7919) % len(pool)]}\n" for n in range(start, min(reads, start + 100_000))
                ))
        os.replace(str(fasta) + ".tmp", fasta)
    if not mates[1].exists():
        for mate, path in zip((1, 2), mates):
            with igzip.open(str(path) + ".tmp", "wb", compresslevel=1) as out:
                half = reads // 2
                for start in range(0, half, 100_000):
                    block = []
                    for n in range(start, min(half, start + 100_000)):
                        sequence = pool[(n * 7919 + mate) % len(pool)]
                        block.append(f"@M00001:7:000000000-A1B2C:1:1101:{n}:{mate} {mate}:N:0:ACGTAC\n"
                                     f"{sequence}\n+\n{'F' * len(sequence)}\n")
                    out.write("".join(block).encode())
            os.replace(str(path) + ".tmp", path)
    return {"fasta": [fasta], "fastq.gz": mates}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plan(paths: list[Path], out: Path) -> dict:
    from job.inputs import resolve_inputs
    from job.plan import Planner, load_plan, plan_header
    from job.store import LocalStore

    shutil.rmtree(out, ignore_errors=True)
    store = LocalStore(str(out))
    inputs = resolve_inputs(tuple(map(str, paths)), None)
    started = time.perf_counter()
    cpu_started = time.process_time()
    header = plan_header(store, inputs, {"bench": 1}, None, None)
    header_seconds = time.perf_counter() - started
    Planner(store, header, None, threading.Event()).scan()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    plan = load_plan(store)
    assert plan is not None and plan.complete, plan
    size = sum(p.stat().st_size for p in paths)
    text = sum(g.end - g.offset for s in plan.shards for g in s.segments)
    return {
        "reads": plan.total_reads, "shards": len(plan.shards), "shard_reads": plan.shard_reads,
        "seconds": round(seconds, 2), "header_seconds": round(header_seconds, 3),
        "reads_per_s": round(plan.total_reads / seconds), "input_mb_per_s": round(size / seconds / 1e6, 1),
        # CPU time: what one core does, whatever else shares the machine
        "cpu_seconds": round(cpu_seconds, 2), "reads_per_cpu_s": round(plan.total_reads / cpu_seconds),
        "input_mb_per_cpu_s": round(size / cpu_seconds / 1e6, 1),
        "text_mb_per_s": round(text / seconds / 1e6, 1), "input_bytes": size, "text_bytes": text,
        "peak_rss_mib": round(_peak_rss_mib(), 1),
    }


def _shards(out: Path) -> dict:
    """Read every shard as a worker does; count the bytes given to the reader."""
    import io

    import job.plan
    from job.plan import load_plan, shard_records
    from job.store import LocalStore

    store = LocalStore(str(out))
    plan = load_plan(store)
    assert plan is not None and plan.complete
    counted = [0]
    real = job.plan.read_records

    def counting(stream, name, first_line=1):  # noqa: ANN001, ANN202
        data = stream.read()
        counted[0] += len(data)
        return real(io.BytesIO(data), name, first_line)

    job.plan.read_records = counting
    times = []
    for shard in plan.shards:
        started = time.perf_counter()
        for _ in shard_records(plan, shard, None, store):
            pass
        times.append(time.perf_counter() - started)
    text = sum(g.end - g.offset for s in plan.shards for g in s.segments)
    job.plan.read_records = real

    def best_of_3(shard) -> float:  # noqa: ANN001 (one timing is at the mercy of the machine's other load)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in shard_records(plan, shard, None, store):
                pass
            best = min(best, time.perf_counter() - started)
        return best

    first, last = best_of_3(plan.shards[0]), best_of_3(plan.shards[-1])
    return {
        "shards": len(times), "first_shard_s": round(first, 4), "last_shard_s": round(last, 4),
        "last_over_first": round(last / first, 2),
        # the plan pass reads (or inflates) the text once, the workers read it again
        "bytes_per_input_byte": round((text + counted[0]) / text, 3),
    }


def _first_claim(paths: list[Path], work: Path) -> dict:
    from job_support import JobProcess, subprocess_env, virnucpro

    models = work / "models"
    if not models.exists():
        subprocess.run(virnucpro("make-demo-models", str(models)), check=True, env=subprocess_env(), capture_output=True)
    out = work / "first-claim-out"
    shutil.rmtree(out, ignore_errors=True)
    args = virnucpro(
        "run", "--input", *map(str, paths), "--output", str(out), "--device", "cpu", "--workers", "2",
        "--esm-model", str(models / "esm2_demo.pt"), "--dnabert-model", str(models / "dnabert_demo"),
        "--classifier", str(models / "classifier_500.pth"), "--imds-url", "http://127.0.0.1:9",
    )
    started = time.monotonic()
    job = JobProcess(args, subprocess_env())
    seen: dict[str, float] = {}  # when each step was first logged, seconds from the start
    steps = ("run_planned", "workers_started", "engine_ready", "shard_claimed", "plan_complete")
    while "shard_claimed" not in seen and job.process.poll() is None and time.monotonic() - started < 600:
        for event in list(job.events):
            if event.get("event") in steps and event["event"] not in seen:
                seen[event["event"]] = round(time.monotonic() - started, 2)
        if "shard_published" not in seen and (out / "_run" / "plan" / "shards" / "00000.json").exists():
            seen["shard_published"] = round(time.monotonic() - started, 2)  # the data path's part is done
        time.sleep(0.05)
    job.process.send_signal(signal.SIGTERM)
    job.wait(timeout=120)
    shutil.rmtree(out, ignore_errors=True)
    return {"first_claim_s": seen.get("shard_claimed"), "steps_s": seen}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _merge_setup(store, reads: int) -> float:  # noqa: ANN001 (Store)
    """A finished run of `reads` generated reads (20,000 a shard, parts of 2,000); seconds taken."""
    from job.inputs import InputObject
    from job.parts import PART_SUFFIX, pack_rows
    from job.plan import DONE_KEY, PLAN_KEY, Plan, Segment, Shard
    from job.shards import Part, ShardState, shard_key
    from job.summary import RunStats

    started = time.perf_counter()
    shard_reads, part_reads = 20_000, 2_000
    plan = Plan("bench", (InputObject("/bench.fa", 0, "0"),), {"chunk_length": 500}, shard_reads, 0.0)
    shards, start = [], 0
    while start < reads:
        count = min(shard_reads, reads - start)
        shards.append(Shard(len(shards), (Segment(0, start, count, 0, 0, 1, None),), count, (), 0).to_dict())
        start += count
    store.create(PLAN_KEY, plan.header_json())
    store.create(DONE_KEY, json.dumps({"shards": shards, "reads": reads, "empty_inputs": []}).encode())
    for shard in shards:
        parts = []
        for first in range(0, shard["reads"], part_reads):
            n0 = shard["segments"][0][1] + first
            ids = [f"read{n}" for n in range(n0, n0 + min(part_reads, shard["reads"] - first))]
            reads_rows = [f"{i}\t150\t1\t1\t0.5\tothers\t\t0\t/bench.fa\n" for i in ids]
            counts = RunStats([], 500)
            for line in reads_rows:
                counts.add_row(line)
            rows = pack_rows(
                reads=reads_rows,
                predictions=[f"{i}_chunk_1F1\tothers\t0.6\t0.4\n" for i in ids[::10]],
                highest=sorted(f"{i}_chunk_1\t0.4\t0.6\tothers\n" for i in ids[::10]),
                outcomes={"others": len(ids)}, counts=counts.counts_json(), viral=None,
            )
            key = f"_run/parts/{shard['index']:05d}/bench-{first:06d}{PART_SUFFIX}"
            store.put(key, rows)
            parts.append(Part(key, None, len(ids), len(ids) // 10, 1.0, 0.0, "cpu"))
        state = ShardState(shard["index"], attempt=1, parts=tuple(parts), done=True)
        store.create(shard_key(shard["index"]), state.to_json())
    return time.perf_counter() - started


def _merge(reads: int, work: Path, s3: bool) -> dict:
    """The merge of a finished run of `reads` generated reads, one reads.tsv row each (one
    frame and one chunk row per 10 reads). Local: the run is made by a child process, so
    that the peak RSS is the merge's alone; S3: a moto server in a child process."""
    import job.merge
    from job.merge import MergeClaim, MergeInputs, merge
    from job.plan import load_plan
    from job.store import LocalStore, open_store

    server = None
    if s3:
        import boto3
        from job_support import AWS_ENV

        # moto in its own process, as S3 is: its CPU time is not the merge's
        server = subprocess.Popen(
            [sys.executable, "-c", "import time\nfrom job_support import start_moto\n"
             "print(start_moto().url, flush=True)\ntime.sleep(10**6)"],
            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}"),
        )
        atexit.register(server.kill)  # also when the merge fails: its stderr is ours, the caller waits for it
        os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=server.stdout.readline().strip())
        boto3.client("s3").create_bucket(Bucket="bench")
        store = open_store("s3://bench/merge")
        made = _merge_setup(store, reads)
    else:
        out = work / "merge-out"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        command = [sys.executable, __file__, "--reads", str(reads), "--work", str(work), "--piece", "merge-setup:local"]
        subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        made = time.perf_counter() - started
        store = LocalStore(str(out))
    complete = load_plan(store)
    # As in the job, where the process that merges loaded the report's matplotlib while its
    # workers ran (job/batch.py): imported before the merge, and its time printed apart.
    started = time.perf_counter()
    import job.report  # noqa: F401
    report_import = time.perf_counter() - started
    before = _peak_rss_mib()
    server_cpu = _cpu_seconds(server.pid) if server is not None else 0.0
    scratch = work / "merge-tmp"  # the merge's temporary directory, its size sampled while it runs
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    tempfile.tempdir = str(scratch)
    sampler = _PeakSize(scratch)
    started, cpu_started = time.perf_counter(), time.process_time()
    inputs = MergeInputs(write_features=False, feature_dim=4, demo_models=False, endpoint_url=None, lease_seconds=60)
    claim = MergeClaim(store, "bench", 60)
    assert claim.acquire()
    with sampler:
        marker, summary = merge(store, complete, inputs, claim, threading.Event())
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tempfile.tempdir = None
    server_cpu = _cpu_seconds(server.pid) - server_cpu if server is not None else 0.0
    assert marker == "_SUCCESS" and summary["reads"] == reads
    return {
        "store": "moto S3" if s3 else "local", "reads": reads, "seconds": round(seconds, 2),
        "reads_per_s": round(reads / seconds), "setup_seconds": round(made, 1),
        # CPU time of the merge process (and of the moto server's process): the machine is shared
        "cpu_seconds": round(cpu_seconds, 2), "reads_per_cpu_s": round(reads / cpu_seconds),
        **({"server_cpu_seconds": round(server_cpu, 2)} if server is not None else {}),
        "peak_rss_mib": round(_peak_rss_mib(), 1), "rss_before_merge_mib": round(before, 1),
        "run_rows": job.merge.RUN_ROWS, "report_import_seconds_before_merge": round(report_import, 2),
        # local disk the merge needed besides the output, sampled every 0.05 s; beside the
        # highest-score file, which its sorted runs (on that disk) hold once
        "peak_tmp_mb": round(sampler.peak / 1e6, 1),
        "highest_mb": round(summary["files"]["prediction_results_highestscore.csv"]["bytes"] / 1e6, 1),
    }


class _PeakSize(threading.Thread):
    """The largest total size of the files under a directory while the block runs."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory, self.peak = directory, 0
        self._done = threading.Event()

    def __enter__(self) -> _PeakSize:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        while not self._done.wait(0.05):
            total = 0
            for root, _dirs, files in os.walk(self.directory):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_size
                    except FileNotFoundError:  # removed while walked
                        pass
            self.peak = max(self.peak, total)


def _gzip_options(paths: list[Path], work: Path) -> dict:
    """What the gzip access choice rests on: inflate and deflate speeds, index size."""
    import gzip
    import zlib

    from isal import igzip

    with igzip.open(paths[0]) as handle:
        text = handle.read(128 * 2**20)
    packed = gzip.compress(text, 6)
    figures: dict[str, object] = {"text_mb": round(len(text) / 1e6, 1), "ratio_level6": round(len(packed) / len(text), 3)}

    def rate(action) -> float:  # noqa: ANN001
        started = time.perf_counter()
        action()
        return round(len(text) / (time.perf_counter() - started) / 1e6, 1)

    figures["zlib_inflate_mb_s"] = rate(lambda: zlib.decompress(packed, 31))
    figures["isal_inflate_mb_s"] = rate(lambda: igzip.decompress(packed))
    figures["isal_deflate_level1_mb_s"] = rate(lambda: igzip.compress(text, 1, mtime=0))
    figures["zlib_deflate_level1_mb_s"] = rate(lambda: gzip.compress(text, 1, mtime=0))
    try:
        import indexed_gzip
    except ImportError:
        return figures
    source = work / "gzip-options.gz"
    source.write_bytes(packed)

    def indexed() -> None:
        with indexed_gzip.IndexedGzipFile(str(source), spacing=4 * 2**20) as handle:
            while handle.read(8 * 2**20):
                pass
            handle.export_index(str(work / "gzip-options.gzidx"))

    figures["indexed_gzip_build_and_read_mb_s"] = rate(indexed)
    points = len(text) / (4 * 2**20)
    figures["indexed_gzip_bytes_per_point"] = round((work / "gzip-options.gzidx").stat().st_size / points)
    return figures


def _piece(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    inputs = generate(work, args.reads)
    kind, name = args.piece.split(":")
    if kind == "plan":
        return _plan(inputs[name], work / f"plan-{name}-{args.reads}")
    if kind == "shards":
        return _shards(work / f"plan-{name}-{args.reads}")
    if kind == "first-claim":
        return _first_claim(inputs[name], work)
    if kind == "merge":
        return _merge(args.reads, work, name == "s3")
    if kind == "merge-setup":
        from job.store import LocalStore

        return {"seconds": _merge_setup(LocalStore(str(work / "merge-out")), args.reads)}
    if kind == "gzip":
        return _gzip_options(inputs["fastq.gz"], work)
    raise SystemExit(f"unknown piece {args.piece}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=100_000)
    parser.add_argument("--only", default="plan,shards,first-claim,merge", help="comma-separated pieces")
    parser.add_argument("--formats", default="fasta,fastq.gz")
    parser.add_argument("--s3", action="store_true", help="merge into a moto S3 server too")
    parser.add_argument("--work", default="/tmp/virnucpro-input-scale")
    parser.add_argument("--piece", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.piece:
        print(json.dumps(_piece(args)))
        return
    generate(Path(args.work), args.reads)
    only = args.only.split(",")
    pieces = [f"{kind}:{name}" for kind in ("plan", "shards", "first-claim") if kind in only for name in args.formats.split(",")]
    if "gzip" in only:
        pieces.append("gzip:options")
    if "merge" in only:
        pieces += ["merge:local"] + (["merge:s3"] if args.s3 else [])
    for piece in pieces:
        command = [sys.executable, __file__, "--reads", str(args.reads), "--work", args.work, "--piece", piece]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            print(f"{piece}: failed\n{done.stderr[-3000:]}", flush=True)
            continue
        print(f"{piece} reads={args.reads}: {done.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
