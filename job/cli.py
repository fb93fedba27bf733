"""`virnucpro`: the command line. Every subcommand builds its inputs here and hands off.

A newcomer follows a read from here: `run` -> job.local_run (or the batch job) ->
core.pipeline.Predictor -> core.frames, core.dnabert, core.esm2, core.classifier.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.errors import ModelLoadError
from core.fasta import FastaError
from job import exit_codes
from job.config import RunConfig
from job.log import configure, get_logger


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure()
    try:
        return args.handler(args)
    except (FastaError, ModelLoadError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"virnucpro: error: {exc}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except ValueError as exc:  # bad arguments found past argparse (chunk length, classifier format)
        print(f"virnucpro: error: {exc}", file=sys.stderr)
        return exit_codes.BAD_INPUT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virnucpro",
        description="Identify viral reads with VirNucPro (DNABERT-S + ESM-2 3B + MLP).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    translate = commands.add_parser(
        "translate", help="chunk and six-frame translate a FASTA file (the published tool's files)"
    )
    translate.add_argument("--input", required=True, help="FASTA file, plain or gzip")
    translate.add_argument("--chunk-length", type=int, choices=(300, 500), required=True)
    translate.add_argument("--out-dir", required=True, help="writes chunked.fa, identified_nucleotide.fa, identified_protein.faa")
    translate.set_defaults(handler=_translate)

    run = commands.add_parser("run", help="predict: FASTA in, prediction tables out")
    run.add_argument("--input", nargs="+", required=True, help="FASTA file(s), plain or gzip")
    run.add_argument("--output", required=True, help="output directory")
    run.add_argument("--esm-model", required=True, help="fair-esm checkpoint file or model name")
    run.add_argument("--dnabert-model", required=True, help="DNABERT-S Hugging Face directory or hub id")
    run.add_argument("--classifier", required=True, help="published .pth or converted .safetensors")
    run.add_argument("--chunk-length", type=int, choices=(300, 500), help="default: the classifier's")
    run.add_argument("--force-chunk-length", action="store_true", help="allow a chunk length the classifier was not trained for")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--batch-tokens", type=int, help="tokens per packed batch (default: from free memory)")
    run.add_argument("--write-features", action="store_true", help="also write features.h5")
    run.set_defaults(handler=_run)

    demo = commands.add_parser("make-demo-models", help="write tiny random models in the real formats")
    demo.add_argument("directory")
    demo.set_defaults(handler=_make_demo_models)

    convert = commands.add_parser("convert-classifier", help="published .pth -> .safetensors (no code executed)")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.add_argument("--chunk-length", type=int, choices=(300, 500), help="default: from the file name")
    convert.set_defaults(handler=_convert_classifier)
    return parser


def _translate(args: argparse.Namespace) -> int:
    from core.fasta import open_fasta
    from core.frames import chunk_record, open_frames
    from core.outputs import chunk_fasta, frame_fasta

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = {}
    with (
        open(out / "chunked.fa", "w") as chunked,
        open(out / "identified_nucleotide.fa", "w") as nucleotides,
        open(out / "identified_protein.faa", "w") as proteins,
    ):
        for record in open_fasta(args.input):
            if record.status is not None:
                skipped[record.status] = skipped.get(record.status, 0) + 1
                continue
            chunks = chunk_record(record.id, record.sequence, args.chunk_length)
            frames = [frame for kept in open_frames(chunks) for frame in kept]
            chunked.writelines(chunk_fasta(chunks))
            nucleotides.writelines(frame_fasta(frames, protein=False))
            proteins.writelines(frame_fasta(frames, protein=True))
    if skipped:
        get_logger().warning("records_skipped", input=args.input, by_reason=skipped)
    return exit_codes.OK


def _run(args: argparse.Namespace) -> int:
    from job.local_run import run_local

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
        write_features=args.write_features,
    )
    run_local(config)
    return exit_codes.OK


def _make_demo_models(args: argparse.Namespace) -> int:
    from core.classifier import write_demo_classifier
    from core.dnabert import write_demo_model
    from core.esm2 import write_demo_checkpoint

    out = Path(args.directory)
    out.mkdir(parents=True, exist_ok=True)
    esm_dim = write_demo_checkpoint(out / "esm2_demo.pt")
    dna_dim = write_demo_model(out / "dnabert_demo")
    write_demo_classifier(
        out / "classifier_500.pth", out / "classifier_500.safetensors",
        input_dim=dna_dim + esm_dim, chunk_length=500,
    )
    get_logger().info("demo_models_written", directory=str(out), warning="random weights: scores are meaningless")
    return exit_codes.OK


def _convert_classifier(args: argparse.Namespace) -> int:
    from core.classifier import convert_classifier

    convert_classifier(args.source, args.destination, args.chunk_length)
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
