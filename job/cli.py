"""`virnucpro`: the command line. Every subcommand builds its inputs here and hands off.

A newcomer follows a read from here: `run` -> job.batch (plan, workers, merge) -> job.worker ->
core.pipeline.Predictor -> core.frames, core.dnabert, core.esm2, core.classifier.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.frames import KNOWN_CHUNK_LENGTHS
from core.errors import UserError
from job import exit_codes
from job.config import RunConfig
from job.log import configure, get_logger, redact
from job.signals import stop_on_signals


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure(getattr(args, "log_format", "json"))
    try:
        return args.handler(args)
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"virnucpro: error: {redact(str(exc))}", file=sys.stderr)
        return exit_codes.BAD_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virnucpro",
        description="Identify viral reads with VirNucPro (DNABERT-S + ESM-2 3B + MLP).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    translate = commands.add_parser(
        "translate", help="chunk and six-frame translate a FASTA or FASTQ file (the published tool's files)"
    )
    translate.add_argument("--input", required=True, help="FASTA or FASTQ file, plain or gzip")
    translate.add_argument("--chunk-length", type=int, choices=KNOWN_CHUNK_LENGTHS, required=True)
    translate.add_argument("--out-dir", required=True, help="writes chunked.fa, identified_nucleotide.fa, identified_protein.faa")
    translate.set_defaults(handler=_translate)

    run = commands.add_parser(
        "run", help="predict as a resumable batch job: FASTA or FASTQ in, prediction tables out",
        description="Spot-safe batch run. The same command resumes an interrupted run, splits the "
        "work when started on several machines, and reports a finished run.",
    )
    run.add_argument("--input", nargs="+", required=True, help="FASTA or FASTQ files, directories or s3:// objects/prefixes (plain or gzip)")
    run.add_argument("--output", required=True, help="output directory or s3://bucket/prefix (holds the run's state too)")
    run.add_argument("--esm-model", required=True, help="fair-esm checkpoint file (or s3:// URI) or model name")
    run.add_argument("--dnabert-model", required=True, help="DNABERT-S Hugging Face directory (or s3:// prefix) or hub id")
    run.add_argument("--classifier", required=True, help="published .pth or converted .safetensors (or s3:// URI)")
    run.add_argument("--chunk-length", type=int, choices=KNOWN_CHUNK_LENGTHS, help="default: the classifier's")
    run.add_argument("--force-chunk-length", action="store_true", help="allow a chunk length the classifier was not trained for")
    run.add_argument("--device", default=RunConfig.device, choices=("auto", "cpu", "cuda"))
    run.add_argument("--batch-tokens", type=int, help="tokens per packed batch on a GPU (default: from free memory; the CPU embeds one sequence per batch)")
    compiling = run.add_mutually_exclusive_group()
    compiling.add_argument("--no-compile", dest="compile", action="store_const", const=False, default=RunConfig.compile, help="run the GPU engine without torch.compile (slower; to rule the compiler out)")
    compiling.add_argument("--compile", dest="compile", action="store_const", const=True, help="torch.compile the engine on the CPU too (by default only a GPU's is compiled; slow to start, for trying the compiled path and its caches without a GPU)")
    run.add_argument("--write-features", action="store_true", help="also write features.h5")
    run.add_argument("--min-virus-score", type=float, metavar="P", help="call a read virus when its max P(virus) (score2) is at least P (default: the published rule, max P(virus) >= max P(others) in a chunk); the published files do not change")
    run.add_argument("--write-viral-reads", action="store_true", help="also write viral_reads.fa.gz: every read called virus, whole, in input order")
    run.add_argument("--gpu-hour-price", type=float, metavar="PRICE", help="price of one GPU-hour, for the cost line of report.html")
    run.add_argument("--log-format", choices=("auto", "json"), default=RunConfig.log_format, help="auto: a progress bar when stderr is a terminal, else JSON lines; json: JSON lines always (default: %(default)s)")
    batch = run.add_argument_group("batch job")
    batch.add_argument("--workers", type=int, help="worker processes (default: one per visible GPU, else 1)")
    batch.add_argument("--slot", type=int, help="this machine's slot (default: AWS_BATCH_JOB_ARRAY_INDEX or JOB_COMPLETION_INDEX)")
    batch.add_argument("--slots", type=int, help="number of slots (default: AWS_BATCH_JOB_ARRAY_SIZE)")
    batch.add_argument("--shard-reads", type=int, default=RunConfig.shard_reads, help="reads per shard (default: automatic, about 32 shards of 500 to 20,000 reads)")
    batch.add_argument("--group-reads", type=int, default=RunConfig.group_reads, help="reads scored together (default: %(default)s; changes the last digits of scores)")
    batch.add_argument("--no-reuse", dest="reuse", action="store_false", help="embed every frame, even one whose nucleotides or protein were embedded earlier in its shard (slower; for benchmarks; changes the last digits of scores on a GPU)")
    batch.add_argument("--checkpoint-seconds", type=float, default=RunConfig.checkpoint_seconds, help="commit results at least this often (default: %(default)s)")
    batch.add_argument("--grace-seconds", type=float, default=RunConfig.grace_seconds, help="time to stop after SIGTERM (default: %(default)s)")
    batch.add_argument("--lease-seconds", type=float, default=RunConfig.lease_seconds, help="a shard's lease lasts this long unless renewed (default: %(default)s)")
    batch.add_argument("--max-attempts", type=int, default=RunConfig.max_attempts, help="failed attempts (errors; interruptions do not count) before a shard is given up (default: %(default)s)")
    batch.add_argument("--retry-failed", action="store_true", help="a run that ended _FAILED: run its failed shards again, keeping all committed work")
    batch.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    batch.add_argument("--model-cache", default=RunConfig.model_cache, help="where s3:// models are downloaded (default: %(default)s)")
    batch.add_argument("--imds-url", default=RunConfig.imds_url, help="EC2 metadata service polled for spot notices; auto (default): polled only on EC2 or AWS Batch/ECS/EKS, never elsewhere")
    run.set_defaults(handler=_run, parser=run)

    status = commands.add_parser("status", help="progress of a batch run: shards, reads/s, ETA")
    status.add_argument("--output", required=True, help="the run's --output")
    status.add_argument("--s3-endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status, parser=status)

    demo = commands.add_parser("make-demo-models", help="write tiny random models in the real formats")
    demo.add_argument("directory")
    demo.set_defaults(handler=_make_demo_models)

    convert = commands.add_parser("convert-classifier", help="published .pth -> .safetensors (no code executed)")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--chunk-length", type=int, choices=KNOWN_CHUNK_LENGTHS, help="default: from the file name")
    convert.set_defaults(handler=_convert_classifier)

    bench = commands.add_parser("bench", help="time the GPU engine against the published paths (random weights)")
    bench.add_argument("--device", default="cuda", help="device to measure (default: cuda)")
    bench.add_argument("--json", help="write the full results here")
    bench.add_argument("--quick", action="store_true", help="tiny models on the CPU (CI): exercises the command, measures nothing useful")
    bench.set_defaults(handler=_bench, parser=bench)
    return parser


def _translate(args: argparse.Namespace) -> int:
    from core.reads import open_records
    from core.frames import chunk_record, open_frames
    from core.outputs import chunk_fasta, frame_fasta

    from job.errors import BadInput

    if not Path(args.input).is_file():
        raise BadInput(f"input {args.input} does not exist or is not a file; check the path")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ("chunked.fa", "identified_nucleotide.fa", "identified_protein.faa")
    partial = [out / f".{name}.partial" for name in names]  # renamed when whole: no output is left half-written
    skipped: dict[str, int] = {}
    try:
        with open(partial[0], "w") as chunked, open(partial[1], "w") as nucleotides, open(partial[2], "w") as proteins:
            for record in open_records(args.input):
                if record.status is not None:
                    skipped[record.status] = skipped.get(record.status, 0) + 1
                    continue
                chunks = chunk_record(record.id, record.sequence, args.chunk_length)
                frames = [frame for kept in open_frames(chunks) for frame in kept]
                chunked.writelines(chunk_fasta(chunks))
                nucleotides.writelines(frame_fasta(frames, protein=False))
                proteins.writelines(frame_fasta(frames, protein=True))
    except BaseException:
        for path in partial:
            path.unlink(missing_ok=True)
        raise
    for path, name in zip(partial, names):
        path.replace(out / name)
    if skipped:
        get_logger().warning("records_skipped", input=args.input, by_reason=skipped)
    return exit_codes.OK


def _run(args: argparse.Namespace) -> int:
    # First, before torch is imported (seconds): a stop during start-up exits 75 as well.
    stop = threading.Event()
    stop_on_signals(stop)
    from job.batch import run_batch

    _check_ranges(args)
    _check_endpoint(args, os.environ)
    slot, slots = _slot(args, os.environ)
    config = RunConfig(
        inputs=tuple(args.input),
        output=args.output,
        esm_model=args.esm_model,
        dnabert_model=args.dnabert_model,
        classifier=args.classifier,
        chunk_length=args.chunk_length,
        force_chunk_length=args.force_chunk_length,
        device=args.device,
        batch_tokens=args.batch_tokens,
        compile=args.compile,
        write_features=args.write_features,
        min_virus_score=args.min_virus_score,
        write_viral_reads=args.write_viral_reads,
        gpu_hour_price=args.gpu_hour_price,
        log_format=args.log_format,
        workers=args.workers,
        slot=slot,
        slots=slots,
        shard_reads=args.shard_reads,
        group_reads=args.group_reads,
        reuse=args.reuse,
        checkpoint_seconds=args.checkpoint_seconds,
        grace_seconds=args.grace_seconds,
        lease_seconds=args.lease_seconds,
        max_attempts=args.max_attempts,
        retry_failed=args.retry_failed,
        s3_endpoint_url=args.s3_endpoint_url,
        model_cache=args.model_cache,
        imds_url=args.imds_url,
    )
    return run_batch(config, stop)


def _check_ranges(args: argparse.Namespace) -> None:
    """Numbers out of range are a bad command line (exit 2), like a malformed one."""
    for flag, value, least in (
        ("--shard-reads", args.shard_reads, 1), ("--group-reads", args.group_reads, 1),
        ("--workers", args.workers, 1), ("--max-attempts", args.max_attempts, 1), ("--batch-tokens", args.batch_tokens, 1),
        ("--lease-seconds", args.lease_seconds, 0.1), ("--checkpoint-seconds", args.checkpoint_seconds, 0),
        ("--grace-seconds", args.grace_seconds, 0), ("--gpu-hour-price", args.gpu_hour_price, 0),
    ):
        if value is not None and not value >= least:  # `not >=`: NaN is refused too
            args.parser.error(f"{flag} must be at least {least}, not {value}")
    if args.min_virus_score is not None and not 0 <= args.min_virus_score <= 1:
        args.parser.error(f"--min-virus-score is a probability, from 0 to 1, not {args.min_virus_score}")


def _check_endpoint(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """The S3 endpoint (--s3-endpoint-url, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL)
    must be a URL without credentials (scheme://user:password@host): botocore does not use
    them, s3fs waits forever on such a URL, and a URL is easily logged. Neither error
    prints the URL, which may hold a secret."""
    for name, value in (("--s3-endpoint-url", args.s3_endpoint_url),
                        ("AWS_ENDPOINT_URL_S3", environ.get("AWS_ENDPOINT_URL_S3")),
                        ("AWS_ENDPOINT_URL", environ.get("AWS_ENDPOINT_URL"))):
        if not value:
            continue
        try:
            url = urllib.parse.urlsplit(value)
            usable = url.scheme in ("http", "https") and bool(url.hostname)
        except ValueError:  # such as an unclosed [ of an IPv6 address
            usable = False
        if "@" in value.split("//", 1)[-1].split("/", 1)[0]:  # user:password@ even without a scheme
            args.parser.error(
                f"{name} must not hold credentials (user:password@ before the host); give them "
                "as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or as an AWS profile"
            )
        if not usable:
            args.parser.error(f"{name} is not an http:// or https:// URL with a host (such as https://host:port); check it")
        return  # the one in use


def _slot(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[int | None, int | None]:
    """This machine's slot among `slots`: --slot/--slots, else AWS Batch array, else Kubernetes index."""
    slots = args.slots if args.slots is not None else _int_env(environ, "AWS_BATCH_JOB_ARRAY_SIZE")
    slot = args.slot
    for name in ("AWS_BATCH_JOB_ARRAY_INDEX", "JOB_COMPLETION_INDEX"):
        if slot is None:
            slot = _int_env(environ, name)
    if slots is None:
        if args.slot is not None:
            args.parser.error("--slot needs --slots (or AWS_BATCH_JOB_ARRAY_SIZE)")
        return None, None
    if slots < 1 or not 0 <= (slot or 0) < slots:
        args.parser.error(f"slot {slot} is not within --slots {slots}")
    return slot or 0, slots


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _status(args: argparse.Namespace) -> int:
    import json

    from botocore.exceptions import BotoCoreError, ClientError

    from job.status import run_status
    from job.store import open_store

    _check_endpoint(args, os.environ)
    try:
        status = run_status(open_store(args.output, args.s3_endpoint_url))
    except (ClientError, BotoCoreError, OSError) as exc:
        print(f"virnucpro: error: cannot read the run at {args.output} ({redact(f'{type(exc).__name__}: {exc}')}); "
              "check the URI, --s3-endpoint-url and the credentials", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if status is None:
        print(f"virnucpro: error: no run under {args.output} (no plan yet); check the URI", file=sys.stderr)
        return exit_codes.BAD_INPUT
    print(json.dumps(status.as_dict(), indent=2) if args.json else f"{status.bar()}\n{status.line()}")
    return exit_codes.BAD_INPUT if status.error else exit_codes.OK


def _make_demo_models(args: argparse.Namespace) -> int:
    from core.classifier import write_demo_classifier
    from core.dnabert import write_demo_model
    from core.esm2 import write_demo_checkpoint

    out = Path(args.directory)
    out.mkdir(parents=True, exist_ok=True)
    esm_dim, dna_dim = 64, 64
    write_demo_checkpoint(out / "esm2_demo.pt", num_layers=2, embed_dim=esm_dim, heads=4)
    write_demo_model(out / "dnabert_demo", layers=2, hidden=dna_dim, heads=4)
    write_demo_classifier(
        out / "classifier_500.pth", out / "classifier_500.safetensors",
        input_dim=dna_dim + esm_dim, hidden_dim=32, chunk_length=500,
    )
    get_logger().info("demo_models_written", directory=str(out), warning="random weights: scores are meaningless")
    return exit_codes.OK


def _convert_classifier(args: argparse.Namespace) -> int:
    from core.classifier import convert_classifier

    convert_classifier(args.source, args.destination, args.chunk_length)
    return exit_codes.OK


def _bench(args: argparse.Namespace) -> int:
    """The bench lives in the source checkout (benchmarks/bench.py), not in the wheel."""
    import importlib.util

    import torch

    if not args.quick and args.device.startswith("cuda") and not torch.cuda.is_available():
        args.parser.error(f"--device {args.device} but no CUDA GPU is visible; use --quick on a CPU")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    if not path.is_file():
        print(f"virnucpro bench runs from a source checkout of VirNucPro ({path} is absent here): "
              "clone the repository and run `python3 -m job.cli bench` in its root", file=sys.stderr)
        return exit_codes.USAGE
    spec = importlib.util.spec_from_file_location("virnucpro_bench", path)
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = bench.run_bench(args.device, args.json, args.quick)
    return exit_codes.OK if not data["errors"] else exit_codes.INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
