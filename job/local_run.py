"""`virnucpro run` on local paths in one process: read, predict, write the four outputs.

Outputs are written under temporary names and renamed when complete, so a file under its
final name is never partial.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import BinaryIO

from core.fasta import mark_duplicates, read_fasta
from core.outputs import HIGHEST_HEADER, PREDICTION_HEADER, READS_HEADER, ChunkConsensus, prediction_lines, reads_line
from core.pipeline import load_predictor
from job.config import RunConfig
from job.features import FeatureWriter
from job.log import get_logger
from job.progress import Progress

DEMO_WARNING = "demo models in use: their scores are meaningless"


class _CountingReader(io.RawIOBase):
    """A binary file wrapper that counts bytes read, for progress over the input."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle, self.count = handle, 0

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._handle.readinto(buffer)  # type: ignore[attr-defined]
        self.count += n or 0
        return n

    def readable(self) -> bool:
        return True


def run_local(config: RunConfig) -> dict:
    """Run the whole prediction into `config.output`; returns the run summary."""
    log = get_logger()
    started = time.monotonic()
    predictor = load_predictor(
        config.esm_model, config.dnabert_model, config.classifier,
        config.chunk_length, config.force_chunk_length, config.device, config.batch_tokens,
    )
    if predictor.is_demo:
        log.warning("demo_models", message=DEMO_WARNING)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    names = ["prediction_results.txt", "prediction_results_highestscore.csv", "reads.tsv"]
    if config.write_features:
        names.append("features.h5")
    tmp = {name: out / f".{name}.partial" for name in names}
    consensus = ChunkConsensus()
    calls: dict[str, int] = {}
    frames_total = 0
    features = (
        FeatureWriter(str(tmp["features.h5"]), predictor.dnabert.dim + predictor.esm.dim)
        if config.write_features else None
    )
    progress = Progress(
        sum(os.path.getsize(p) for p in config.inputs),
        lambda **figures: log.info("progress", **figures),
        interval=10.0,
    )
    done_bytes = 0
    seen: set[str] = set()
    with open(tmp["prediction_results.txt"], "w") as predictions, open(tmp["reads.tsv"], "w") as reads:
        predictions.write(PREDICTION_HEADER)
        reads.write(READS_HEADER)
        for path in config.inputs:
            with open(path, "rb") as raw:
                counted = _CountingReader(raw)
                records = mark_duplicates(read_fasta(counted, path), seen)
                for result in predictor.predict(records, with_features=config.write_features):
                    predictions.writelines(prediction_lines(result.frames))
                    reads.write(reads_line(result.summary))
                    consensus.add(result.frames)
                    if features is not None:
                        features.append([f.frame_id for f in result.frames], result.features)
                    key = result.summary.call if result.summary.call != "none" else result.summary.reason
                    calls[key] = calls.get(key, 0) + 1
                    frames_total += len(result.frames)
                    progress.update(1, done_bytes + counted.count)
                done_bytes += counted.count
    if features is not None:
        features.close()
    with open(tmp["prediction_results_highestscore.csv"], "w") as highest:
        highest.write(HIGHEST_HEADER)
        highest.writelines(consensus.lines())
    for name, path in tmp.items():
        path.replace(out / name)
    summary = {
        "reads": progress.reads,
        "reads_by_outcome": calls,
        "frames": frames_total,
        "chunk_length": predictor.chunk_length,
        "demo_models": predictor.is_demo,
        "wall_seconds": round(time.monotonic() - started, 3),
    }
    if predictor.is_demo:
        summary["warning"] = DEMO_WARNING
    (out / "_SUCCESS").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("finished", **{k: v for k, v in summary.items() if k != "warning"})
    return summary
